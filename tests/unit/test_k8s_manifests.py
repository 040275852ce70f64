"""infra/k8s: every manifest is rendered like `kubectl kustomize` and validated against schemas.

No Kubernetes API server is needed. RayCluster/RayJob are checked with `jsonschema` against the project's
own copy of the KubeRay v1.7 CRD schemas (infra/k8s/schemas, strict: an unknown field fails, where the API
server would silently prune it); core objects with `kubernetes-validate`'s bundled Kubernetes schemas.

The kustomizations use only what `render` below implements: resources, namespace, labels (metadata only),
JSON 6902 patches, images and whole-subtree replacements. Where `kubectl` is on PATH its own rendering is
compared with ours, so the tests check the real kustomize output.
"""

from __future__ import annotations

import copy
import gzip
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from imagenet_ray.cli import build_parser
from imagenet_ray.config import load_config

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
SCHEMAS = K8S / "schemas"
EXAMPLE = K8S / "secrets.example.yaml"
ROOTS = ["base", "overlays/kueue", "overlays/irsa", "overlays/small"]  # every kustomization a user applies
K8S_VERSION = "1.37.0"  # the newest Kubernetes that kubernetes-validate 1.37.0 bundles
RAY_KINDS = {"RayCluster", "RayJob"}
LABEL_KEY = "imagenet-ray/node-group"
SECRETISH = re.compile(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY)", re.IGNORECASE)

Doc = dict[str, Any]


# --- a small kustomize ----------------------------------------------------------------------------------


def _load_docs(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _pointer(path: str) -> list[str]:
    return [p.replace("~1", "/").replace("~0", "~") for p in path.lstrip("/").split("/")]


def _json_patch(doc: Doc, ops: list[dict[str, Any]]) -> None:
    """RFC 6902 add / replace / remove (what the overlays use)."""
    for op in ops:
        *parents, last = _pointer(op["path"])
        node: Any = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            index = len(node) if last == "-" else int(last)
            if op["op"] == "add":
                node.insert(index, copy.deepcopy(op["value"]))
            elif op["op"] == "replace":
                node[index] = copy.deepcopy(op["value"])
            elif op["op"] == "remove":
                del node[index]
            else:
                raise AssertionError(f"unsupported op {op}")
        elif op["op"] in ("add", "replace"):
            if op["op"] == "replace":
                assert last in node, f"replace of a missing path {op['path']}"
            node[last] = copy.deepcopy(op["value"])
        elif op["op"] == "remove":
            del node[last]
        else:
            raise AssertionError(f"unsupported op {op}")


def _matches(doc: Doc, target: dict[str, str]) -> bool:
    group, _, version = doc["apiVersion"].rpartition("/")
    wanted = {"group": group, "version": version, "kind": doc["kind"], "name": doc["metadata"]["name"]}
    return all(wanted[k] == v for k, v in target.items())


def _containers(node: Any) -> list[Doc]:
    found: list[Doc] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                found.extend(c for c in value if isinstance(c, dict))
            found.extend(_containers(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(_containers(item))
    return found


def _get(doc: Doc, dotted: str) -> Any:
    node: Any = doc
    for part in dotted.split("."):
        node = node[part]
    return node


def _set(doc: Doc, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = doc
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = copy.deepcopy(value)


def _kustomization(directory: Path) -> Doc:
    return yaml.safe_load((directory / "kustomization.yaml").read_text())


def render(directory: Path) -> list[Doc]:
    k = _kustomization(directory)
    unsupported = set(k) - {
        "apiVersion",
        "kind",
        "namespace",
        "labels",
        "resources",
        "patches",
        "images",
        "replacements",
    }
    assert not unsupported, f"{directory}: kustomize features this test does not implement: {unsupported}"
    docs: list[Doc] = []
    for entry in k.get("resources", []):
        path = directory / entry
        docs.extend(render(path) if path.is_dir() else _load_docs(path))
    for patch in k.get("patches", []):
        hits = [d for d in docs if _matches(d, patch["target"])]
        assert hits, f"{directory}: patch target {patch['target']} matches nothing"
        for doc in hits:
            _json_patch(doc, yaml.safe_load(patch["patch"]))
    for doc in docs:
        if "namespace" in k:
            doc["metadata"]["namespace"] = k["namespace"]
        for label in k.get("labels", []):
            assert not label.get("includeSelectors") and not label.get("includeTemplates")
            doc["metadata"].setdefault("labels", {}).update(label["pairs"])
        for image in k.get("images", []):
            for container in _containers(doc):
                name = re.split(r"[:@]", container["image"], maxsplit=1)[0]
                if name == image["name"]:
                    container["image"] = f"{image.get('newName', name)}:{image['newTag']}"
    for replacement in k.get("replacements", []):
        source = replacement["source"]
        (origin,) = [d for d in docs if _matches(d, {"kind": source["kind"], "name": source["name"]})]
        for target in replacement["targets"]:
            for doc in (d for d in docs if _matches(d, target["select"])):
                for field in target["fieldPaths"]:
                    _set(doc, field, _get(origin, source["fieldPath"]))
    return docs


@cache
def rendered(root: str) -> tuple[Doc, ...]:
    return tuple(render(K8S / root))


def by_kind(root: str, kind: str) -> list[Doc]:
    return [d for d in rendered(root) if d["kind"] == kind]


def _key(doc: Doc) -> tuple[str, str, str]:
    return doc["apiVersion"], doc["kind"], doc["metadata"]["name"]


# --- schemas --------------------------------------------------------------------------------------------


def _strict(schema: Any) -> Any:
    """additionalProperties: false on every object schema that lists its properties (the API server would
    prune an unknown field silently; here it fails)."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        lists_fields = "properties" in schema and "additionalProperties" not in schema
        if lists_fields and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [_strict(v) for v in schema]
    return schema


@cache
def ray_validator(kind: str) -> jsonschema.Draft7Validator:
    schema = json.loads(gzip.decompress((SCHEMAS / f"{kind.lower()}.v1.json.gz").read_bytes()))
    return jsonschema.Draft7Validator(_strict(schema))


def validate(doc: Doc) -> None:
    if doc["kind"] in RAY_KINDS:
        assert doc["apiVersion"] == "ray.io/v1"
        errors = sorted(ray_validator(doc["kind"]).iter_errors(doc), key=lambda e: list(e.absolute_path))
        assert not errors, "\n".join(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:5])
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


# --- helpers over the rendered objects -----------------------------------------------------------------


def ray_pin() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [m.group(1) for d in deps if (m := re.fullmatch(r"ray(?:\[[^\]]*\])?==(\S+)", d.strip()))]
    return pin


def cluster_specs(root: str) -> list[tuple[str, Doc]]:
    """(where, spec) of the RayCluster and of every RayJob's embedded cluster."""
    specs = [(f"RayCluster {d['metadata']['name']}", d["spec"]) for d in by_kind(root, "RayCluster")]
    specs += [(f"RayJob {d['metadata']['name']}", d["spec"]["rayClusterSpec"]) for d in by_kind(root, "RayJob")]
    return specs


def entrypoint(job: Doc) -> tuple[str, list[str]]:
    """('train', argv after the script) of `python jobs/train.py ...`."""
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "python" and re.fullmatch(r"jobs/\w+\.py", argv[1]), argv[:2]
    assert (ROOT / argv[1]).is_file(), f"{argv[1]} does not exist"
    return Path(argv[1]).stem, argv[2:]


def gpu_capacity(cluster_spec: Doc) -> int:
    """GPUs of the train group at its largest."""
    (train,) = [g for g in cluster_spec["workerGroupSpecs"] if g["groupName"] == "train"]
    per_pod = int(train["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    return per_pod * int(train["maxReplicas"])


def env_of(container: Doc) -> dict[str, Doc]:
    return {e["name"]: e for e in container.get("env", [])}


def mlflow_url(root: str) -> str:
    (svc,) = [s for s in by_kind(root, "Service") if s["metadata"]["name"] == "mlflow"]
    return f"http://{svc['metadata']['name']}:{svc['spec']['ports'][0]['port']}"


def _quantity_bytes(text: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)?", str(text))
    assert m, text
    return int(m.group(1)) * units.get(m.group(2) or "", 1)


# --- tests ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("root", ROOTS)
def test_every_object_validates_against_its_schema(root):
    docs = rendered(root)
    assert len({_key(d) for d in docs}) == len(docs), "duplicate objects"
    assert {d["kind"] for d in docs} >= {"RayCluster", "RayJob", "Deployment", "StatefulSet", "Service"}
    for doc in docs:
        validate(doc)


def test_validation_rejects_what_the_api_server_would_prune_or_refuse():
    (cluster,) = copy.deepcopy(by_kind("base", "RayCluster"))
    cluster["spec"]["workerGroupSpecs"][0]["minReplica"] = 1  # typo
    with pytest.raises(AssertionError, match="minReplica"):
        validate(cluster)
    (deployment,) = copy.deepcopy([d for d in by_kind("base", "Deployment")])
    deployment["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (its built-in kustomize) not on PATH")
@pytest.mark.parametrize("root", ROOTS)
def test_render_equals_kubectl_kustomize(root):
    out = subprocess.run(["kubectl", "kustomize", str(K8S / root)], capture_output=True, text=True, check=True)
    theirs = {_key(d): d for d in yaml.safe_load_all(out.stdout) if d}
    ours = {_key(d): d for d in rendered(root)}
    assert ours == theirs


def test_secrets_example_is_valid_and_holds_placeholders_only():
    docs = _load_docs(EXAMPLE)
    for doc in docs:
        validate(doc)
        assert doc["kind"] == "Secret"
        for key, value in doc["stringData"].items():
            assert value == "REPLACE_ME" or (key == "username" and value == "mlflow"), (key, value)
    names = {d["metadata"]["name"] for d in docs}
    referenced = {
        e["valueFrom"]["secretKeyRef"]["name"]
        for c in _containers([dict(d) for d in rendered("base")])
        for e in c.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert referenced == names


@pytest.mark.parametrize("root", ROOTS)
def test_no_literal_secrets(root):
    assert not by_kind(root, "Secret"), "Secrets are applied from a copy of secrets.example.yaml, never kept here"
    text = yaml.safe_dump(list(rendered(root)))
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)
    assert not re.search(r"://[^/\s$%:@]+:[^/\s$%@]+@", text), "a URL with a literal password"
    for container in _containers(list(rendered(root))):
        for name, entry in env_of(container).items():
            if SECRETISH.search(name):
                assert set(entry) == {"name", "valueFrom"} and "secretKeyRef" in entry["valueFrom"], entry


def test_ray_version_is_the_pinned_ray():
    for root in ROOTS:
        for where, spec in cluster_specs(root):
            assert spec["rayVersion"] == ray_pin(), f"{root}: {where}"


@pytest.mark.parametrize("root", ROOTS)
def test_groups(root):
    for where, spec in cluster_specs(root):
        head = spec["headGroupSpec"]
        assert head["rayStartParams"]["num-cpus"] == "0", where
        groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
        assert set(groups) == {"train", "decode"}, where
        for group in [head, *groups.values()]:
            # Ray 2.60's KubeRay autoscaler reads the group's `labels` field and ignores rayStartParams' labels.
            assert "labels" not in group["rayStartParams"], where
            assert not any(k.startswith("ray.io/") for k in group["labels"]), "ray.io/* is reserved by Ray"
            pod = group["template"]["spec"]
            assert pod["serviceAccountName"] == "imagenet-ray"
            (container,) = pod["containers"]
            (shm,) = [v for v in pod["volumes"] if v["name"] == "dshm"]
            assert shm["emptyDir"]["medium"] == "Memory"
            assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
            if "object-store-memory" in group["rayStartParams"]:
                assert _quantity_bytes(shm["emptyDir"]["sizeLimit"]) >= int(
                    group["rayStartParams"]["object-store-memory"]
                )
        assert groups["train"]["labels"] == {LABEL_KEY: "train"}
        assert groups["decode"]["labels"] == {LABEL_KEY: "decode"}
        train = groups["train"]["template"]["spec"]
        limits = train["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1
        assert train["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in train["tolerations"])
        decode = groups["decode"]
        decode_resources = decode["template"]["spec"]["containers"][0]["resources"]
        assert not any("gpu" in k for r in decode_resources.values() for k in r)
        assert int(decode_resources["requests"]["cpu"]) >= 8 and decode["minReplicas"] == 0
        for group in groups.values():
            assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]


def test_autoscaling_and_embedded_clusters():
    for root in ("base", "overlays/irsa", "overlays/small"):
        (cluster,) = by_kind(root, "RayCluster")
        assert cluster["spec"]["enableInTreeAutoscaling"] is True
        assert cluster["spec"]["autoscalerOptions"]["version"] == "v2"
        for job in by_kind(root, "RayJob"):
            assert job["spec"]["rayClusterSpec"] == cluster["spec"], f"{root}: {job['metadata']['name']}"
            assert "clusterSelector" not in job["spec"]


def test_kueue_overlay_queues_fixed_size_jobs():
    (cluster,) = by_kind("base", "RayCluster")
    for job in by_kind("overlays/kueue", "RayJob"):
        spec = job["spec"]
        assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "imagenet-ray"
        assert spec["suspend"] is True and spec["shutdownAfterJobFinishes"] is True
        assert spec["rayClusterSpec"]["enableInTreeAutoscaling"] is False
        assert [g["replicas"] for g in spec["rayClusterSpec"]["workerGroupSpecs"]] == [1, 4]
        unpatched = copy.deepcopy(spec["rayClusterSpec"])
        unpatched["enableInTreeAutoscaling"] = True
        unpatched["autoscalerOptions"] = cluster["spec"]["autoscalerOptions"]
        for group in unpatched["workerGroupSpecs"]:
            group["replicas"] = 0
        assert unpatched == cluster["spec"], "the kueue overlay changes only queueing and size"


def test_irsa_overlay_uses_the_default_credential_chain():
    (account,) = by_kind("overlays/irsa", "ServiceAccount")
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    containers = _containers(list(rendered("overlays/irsa")))
    base_env = [env_of(c) for c in _containers(list(rendered("base")))]
    # head, train and decode in the RayCluster and in each of the 4 RayJobs, and MLflow
    assert sum("AWS_ACCESS_KEY_ID" in e for e in base_env) == 3 * 5 + 1
    for container in containers:
        env = env_of(container)
        assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"} & set(env), container["name"]
    kept = [env_of(c) for c in containers if "MLFLOW_TRACKING_URI" in env_of(c) or c["name"] == "mlflow"]
    assert len(kept) == 3 * 5 + 1 and all("AWS_REGION" in e for e in kept)


@pytest.mark.parametrize("root", ROOTS)
def test_jobs(root):
    jobs = {d["metadata"]["name"]: d for d in by_kind(root, "RayJob")}
    assert set(jobs) == {"imagenet-prepare", "imagenet-train", "imagenet-evaluate", "imagenet-predict"}
    for job in jobs.values():
        spec = job["spec"]
        assert spec["submissionMode"] == "K8sJobMode" and spec["shutdownAfterJobFinishes"] is True
        assert spec["ttlSecondsAfterFinished"] > 0 and spec["activeDeadlineSeconds"] > 0 and spec["backoffLimit"] >= 1
        (submitter,) = spec["submitterPodTemplate"]["spec"]["containers"]
        assert float(str(submitter["resources"]["limits"]["cpu"]).removesuffix("m")) <= 1
        assert _quantity_bytes(submitter["resources"]["limits"]["memory"]) <= 2**31
        command, argv = entrypoint(job)
        assert job["metadata"]["labels"]["imagenet-ray/stage"] == command
        build_parser().parse_args([command, *argv])  # the CLI accepts the arguments


@pytest.mark.parametrize("root", ROOTS)
def test_predict_job_runs_on_the_gpu_group_and_reads_and_writes_s3(root):
    (job,) = [j for j in by_kind(root, "RayJob") if j["metadata"]["name"] == "imagenet-predict"]
    _, argv = entrypoint(job)
    args = build_parser().parse_args(["predict", *argv])
    assert args.images.startswith("s3://") and args.out.startswith("s3://") and args.out != args.images
    assert args.model.startswith(("runs:/", "models:/")), "the model comes from MLflow"
    # The GPU group autoscales from 0: --gpu true (auto would see no GPU yet); the actor pool starts at what
    # the group can give on every overlay (an actor waits for its GPU) and grows to at most one per GPU.
    assert args.gpu == "true"
    low, _, high = args.workers.partition(":")  # N or MIN:MAX (predict.parse_workers)
    low, high = int(low), int(high or low)
    assert low <= gpu_capacity(job["spec"]["rayClusterSpec"])
    (base_cluster,) = by_kind("base", "RayCluster")
    assert low <= high <= gpu_capacity(base_cluster["spec"])
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert env_of(head)["MLFLOW_TRACKING_URI"]["value"] == mlflow_url(root), "runs:/ and models:/ resolve there"


@pytest.mark.parametrize("root", ROOTS)
def test_train_job_config_and_node_labels(root):
    (job,) = [j for j in by_kind(root, "RayJob") if j["metadata"]["name"] == "imagenet-train"]
    _, argv = entrypoint(job)
    args = build_parser().parse_args(["train", *argv])
    assert args.config and (ROOT / args.config).is_file(), args.config
    cfg = load_config(ROOT / args.config, args.overrides)
    groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert cfg.data.node_labels, "the train job decodes on the CPU-only group"
    assert any(cfg.data.node_labels.items() <= g["labels"].items() for g in groups), cfg.data.node_labels
    (gpu_group,) = [g for g in groups if cfg.train.node_labels.items() <= g["labels"].items()]
    assert gpu_group["groupName"] == "train", "training workers are placed on the GPU group by its label"
    assert cfg.mlflow.tracking_uri == mlflow_url(root)
    assert cfg.train.storage_path.startswith("s3://") and cfg.data.url.startswith("s3://")
    train_gpus = max(
        int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)) for g in groups
    )
    (train_group,) = [g for g in groups if g["groupName"] == "train"]
    assert cfg.train.max_workers <= train_gpus * train_group["maxReplicas"]
    # A retry must continue the same MLflow run and checkpoints: the run is keyed by name + storage_path,
    # both fixed in the manifest (nothing derived from the attempt or the time).
    assert "$" not in job["spec"]["entrypoint"] and "name=" not in " ".join(args.overrides)


@pytest.mark.parametrize("root", ROOTS)
def test_every_node_labels_in_a_job_is_set_by_a_group(root):
    for job in by_kind(root, "RayJob"):
        groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
        for arg in entrypoint(job)[1]:
            if arg.startswith(("data.node_labels=", "train.node_labels=")):
                wanted = yaml.safe_load(arg.partition("=")[2])
                assert any(wanted.items() <= g["labels"].items() for g in groups), (job["metadata"]["name"], wanted)


@pytest.mark.parametrize("root", ROOTS)
def test_mlflow_wiring(root):
    url = mlflow_url(root)
    for container in _containers(list(rendered(root))):
        env = env_of(container)
        if "MLFLOW_TRACKING_URI" in env:
            assert env["MLFLOW_TRACKING_URI"]["value"] == url
            assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= set(env)
    (deployment,) = [d for d in by_kind(root, "Deployment") if d["metadata"]["name"] == "mlflow"]
    script = deployment["spec"]["template"]["spec"]["containers"][0]["args"][0]
    assert "--app-name basic-auth" in script and "--artifacts-destination s3://" in script
    assert '--backend-store-uri "postgresql://' in script
    hosts = re.search(r'--allowed-hosts "([^"]+)"', script).group(1).split(",")
    namespace = deployment["metadata"]["namespace"]
    assert {"mlflow:5000", f"mlflow.{namespace}:5000", f"mlflow.{namespace}.svc.cluster.local:5000"} <= set(hosts)
    (postgres,) = by_kind(root, "StatefulSet")
    assert any(s["metadata"]["name"] == postgres["spec"]["serviceName"] for s in by_kind(root, "Service"))


def test_images_are_the_kustomize_managed_names():
    images = _kustomization(K8S / "base")["images"]
    logical = {i["name"] for i in images}
    real = {f"{i['newName']}:{i['newTag']}" for i in images}
    for path in (K8S / "base").glob("*.yaml"):
        if path.name != "kustomization.yaml":
            for container in _containers(_load_docs(path)):
                assert container["image"] in logical, f"{path.name}: {container['image']}"
    for root in ROOTS:
        assert {c["image"] for c in _containers(list(rendered(root)))} <= real
    (cluster,) = by_kind("base", "RayCluster")
    (train,) = [g for g in cluster["spec"]["workerGroupSpecs"] if g["groupName"] == "train"]
    assert train["template"]["spec"]["containers"][0]["image"].endswith("-gpu")


def _referenced_files() -> set[Path]:
    seen: set[Path] = set()

    def walk(directory: Path) -> None:
        seen.add(directory / "kustomization.yaml")
        for entry in _kustomization(directory).get("resources", []):
            path = (directory / entry).resolve()
            walk(path) if path.is_dir() else seen.add(path)

    for root in ROOTS:
        walk((K8S / root).resolve())
    return seen


def test_every_file_under_k8s_is_used():
    allowed = {EXAMPLE.resolve()} | {p.resolve() for p in SCHEMAS.iterdir() if p.is_file()}
    files = {p.resolve() for p in K8S.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert files - _referenced_files() - allowed == set()
    kustomizations = {p.parent.relative_to(K8S).as_posix() for p in K8S.rglob("kustomization.yaml")}
    assert kustomizations == set(ROOTS), "a new kustomization must be added to ROOTS (and so rendered and validated)"


def test_every_yaml_under_infra_is_loaded_and_validated_by_a_test():
    everything = sorted(p for ext in ("*.yaml", "*.yml") for p in INFRA.rglob(ext))
    assert everything
    for path in everything:
        _load_docs(path)  # loads
    covered = _referenced_files() | {EXAMPLE.resolve()}  # rendered + validated above; the example validated too
    assert {p.resolve() for p in everything} - covered == set()


def test_schemas_are_the_kuberay_v1_7_ones_and_regenerate(tmp_path):
    assert "KubeRay v1.7" in (SCHEMAS / "README.md").read_text()
    for kind in RAY_KINDS:
        schema = json.loads(gzip.decompress((SCHEMAS / f"{kind.lower()}.v1.json.gz").read_bytes()))
        assert {"apiVersion", "kind", "metadata", "spec"} <= set(schema["properties"])
    # the group-level Ray node `labels` field these manifests rely on (KubeRay >= 1.5)
    raycluster = json.loads(gzip.decompress((SCHEMAS / "raycluster.v1.json.gz").read_bytes()))
    assert "labels" in raycluster["properties"]["spec"]["properties"]["workerGroupSpecs"]["items"]["properties"]
    # extract.py writes the same bytes from CRDs (a synthetic pair written here: no reference data needed)
    import importlib.util

    spec = importlib.util.spec_from_file_location("k8s_schema_extract", SCHEMAS / "extract.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for kind, filename in module.CRDS.items():
        crd = {
            "spec": {
                "names": {"kind": kind},
                "versions": [{"name": "v1", "schema": {"openAPIV3Schema": {"type": "object", "title": kind}}}],
            }
        }
        (tmp_path / filename).write_text(yaml.safe_dump(crd))
    out = tmp_path / "out"
    out.mkdir()
    written = module.extract(tmp_path, out)
    assert [json.loads(gzip.decompress(p.read_bytes()))["title"] for p in written] == list(module.CRDS)
    assert written[0].read_bytes() == gzip.compress(b'{"title":"RayCluster","type":"object"}', 9, mtime=0)
