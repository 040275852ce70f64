"""Regenerate the RayCluster / RayJob v1 schemas the manifest tests validate against.

    python infra/k8s/schemas/extract.py /path/to/kuberay-crds

reads ray.io_rayclusters.yaml and ray.io_rayjobs.yaml (the CRDs of a KubeRay release, e.g. from
ray-operator/config/crd/bases/ at its tag) and writes the `openAPIV3Schema` of each one's v1 version as
compact, gzip-compressed JSON beside this file (`<kind>.v1.json.gz`, deterministic: no gzip timestamp).
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
CRDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}


def extract(crd_dir: Path, out_dir: Path = HERE) -> list[Path]:
    written = []
    for kind, filename in CRDS.items():
        crd = yaml.safe_load((crd_dir / filename).read_text())
        if crd["spec"]["names"]["kind"] != kind:
            raise SystemExit(f"{filename}: kind {crd['spec']['names']['kind']}, expected {kind}")
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schema = version["schema"]["openAPIV3Schema"]
        data = json.dumps(schema, sort_keys=True, separators=(",", ":")).encode()
        out = out_dir / f"{kind.lower()}.v1.json.gz"
        out.write_bytes(gzip.compress(data, compresslevel=9, mtime=0))
        written.append(out)
        print(f"{out.name}: {len(data):,} bytes of JSON, {out.stat().st_size:,} gzipped")
    return written


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    extract(Path(sys.argv[1]))
