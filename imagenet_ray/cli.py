"""`imagenet-ray` commands: synth | prepare | verify | train | evaluate | predict | bench | services | cluster | plan.

Argument parsing and dispatch only. Messages go through `logging` (plain lines: INFO on stdout, warnings on
stderr); a user error ends as one line on stderr and exit 2 (bad config or arguments) or 1.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TextIO

from imagenet_ray.errors import ConfigError, UserError
from imagenet_ray.redact import RedactingFilter

DEFAULT_SERVICES_DIR = ".services"
DEFAULT_CLUSTER_DIR = ".cluster"
log = logging.getLogger(__name__)


class _StdStream(logging.StreamHandler[TextIO]):
    """A handler on whatever sys.stdout/sys.stderr is at emit time (pytest's capsys swaps them)."""

    def __init__(self, name: str) -> None:
        self._stream_name = name
        super().__init__()

    @property
    def stream(self) -> TextIO:
        stream: TextIO = getattr(sys, self._stream_name)
        return stream

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass  # StreamHandler.__init__ and setStream assign it; the stream is looked up at emit time


def configure_logging(level: int = logging.INFO) -> None:
    """Plain messages from this package: below WARNING on stdout (as the program's output always was),
    warnings and errors on stderr. Libraries' loggers are left as they are (their INFO stays quiet)."""
    package = logging.getLogger("imagenet_ray")
    if any(isinstance(h, _StdStream) for h in package.handlers):
        return
    out, err = _StdStream("stdout"), _StdStream("stderr")
    out.addFilter(lambda record: record.levelno < logging.WARNING)
    err.setLevel(logging.WARNING)
    for handler in (out, err):
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.addFilter(RedactingFilter())  # a credential inside a URL never reaches the terminal
        package.addHandler(handler)
    package.setLevel(level)


class _ArgParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse's default prints usage + exits 2; keep it one line
        raise ConfigError(f"{self.prog}: {message}")


def _cmd_synth(args: argparse.Namespace) -> int:
    from imagenet_ray.data.synth import write_synthetic_imagenet

    summary = write_synthetic_imagenet(args.out, args.classes, args.train_per_class, args.val_per_class, args.seed)
    log.info(
        "wrote %d train + %d val images of %d classes to %s (Kaggle CLS-LOC layout)",
        summary.train_images,
        summary.val_images,
        summary.classes,
        summary.url,
    )
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from imagenet_ray.data.format import REPORT_NAME
    from imagenet_ray.data.layouts import LAYOUTS, detect_and_list
    from imagenet_ray.data.prefix_lock import hold_output
    from imagenet_ray.data.prepare import PrepareOptions, prepare
    from imagenet_ray.runtime import absolute_url, ensure_ray

    if args.shard_mb <= 0:
        raise ConfigError("prepare: --shard-mb must be > 0")
    if not 0 <= args.max_quarantine_frac <= 1:
        raise ConfigError("prepare: --max-quarantine-frac must be within [0, 1]")
    if args.max_side is not None and args.max_side < 16:
        raise ConfigError("prepare: --max-side must be ≥ 16")
    if not 1 <= args.quality <= 100:
        raise ConfigError("prepare: --quality must be within [1, 100]")
    if args.layout is not None and args.layout not in LAYOUTS:
        raise ConfigError(f"prepare: --layout must be one of {', '.join(LAYOUTS)}")
    opts = PrepareOptions(
        shard_mb=args.shard_mb,
        seed=args.seed,
        max_quarantine_frac=args.max_quarantine_frac,
        max_side=args.max_side,
        quality=args.quality,
        layout=args.layout,
    )
    source, out = absolute_url(args.source), absolute_url(args.out)
    with hold_output(out) as lock:  # first: a second prepare of `out` stops here, before listing or Ray
        listing = detect_and_list(source, layout=args.layout)  # fail on a bad source before starting Ray
        ensure_ray(1, job="jobs/prepare.py")
        result = prepare(source, out, opts, listing=listing, lock=lock)
    log.info("%s", format_report(result.report))
    mlflow_uri = args.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if mlflow_uri:
        from imagenet_ray.tracking import log_prepared_dataset

        log.info("logged to MLflow run %s", log_prepared_dataset(mlflow_uri, result.report, result.manifest))
    if not result.ok:
        raise UserError("; ".join(result.problems))
    log.info(
        "prepared %s classes from %s (%s layout) to %s: %d shards written, %d already done; report in %s",
        result.report["classes"],
        source,
        listing.layout,
        out,
        result.written_shards,
        result.skipped_shards,
        REPORT_NAME,
    )
    return 0


def format_report(report: dict[str, Any]) -> str:
    lines = [f"layout {report['layout']}, {report['classes']} classes, {report['wall_seconds']:.1f} s"]
    for split, s in report["splits"].items():
        notes = ", ".join(f"{k} {v}" for k, v in s["notes"].items()) or "none"
        lines.append(
            f"{split}: {s['written']:,} written + {s['quarantined']:,} quarantined of {s['listed']:,} listed; "
            f"per class {s['min_per_class']}..{s['max_per_class']}; {s['shards']} shards; "
            f"{s['bytes_in'] / 2**20:,.1f} MB in, {s['bytes_out'] / 2**20:,.1f} MB out; notes: {notes}"
        )
        for q in s["quarantined_files"][:20]:
            lines.append(f"  quarantined {q['key']}: {q['reason']}")
        if len(s["quarantined_files"]) > 20:
            lines.append(f"  ... and {len(s['quarantined_files']) - 20} more (see the report)")
    for split, o in report.get("official", {}).items():
        lines.append(
            f"{split}: {o['listed']:,} listed vs official {o['expected']:,}: {'ok' if o['matches'] else 'DIFFERENT'}"
        )
    return "\n".join(lines)


def _cmd_verify(args: argparse.Namespace) -> int:
    from imagenet_ray.data.verify import verify
    from imagenet_ray.runtime import absolute_url

    url = absolute_url(args.url)
    checked, bad = verify(url)
    for check in bad:
        log.warning("%s: %s", check.path, check.problem)
    if bad:
        raise UserError(
            f"verify {url}: {len(bad)} of {checked} shards do not match the manifest "
            f"(first: {bad[0].path}: {bad[0].problem})"
        )
    log.info("verify %s: all %d shards match the manifest (size, sha256, rows)", url, checked)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from imagenet_ray.config import load_config
    from imagenet_ray.train.trainer import run_training

    cfg = load_config(args.config, args.overrides)
    metrics = run_training(cfg)
    log.info(
        "final: val/top1=%.4f val/top5=%.4f (epoch %s, %d val images)",
        metrics.get("val/top1", float("nan")),
        metrics.get("val/top5", float("nan")),
        metrics.get("epoch"),
        int(metrics.get("val/images", 0)),
    )
    log.info("mlflow run: %s in %s", metrics.get("mlflow_run_id"), metrics["tracking_uri"])
    if metrics.get("checkpoint_url"):
        log.info("checkpoint: %s", metrics["checkpoint_url"])
    if metrics.get("model_uri"):
        log.info(
            "model: %s%s", metrics["model_uri"], f" ({metrics['model_version']})" if "model_version" in metrics else ""
        )
    if metrics["tracking_uri"].startswith("sqlite:///"):
        log.info("open the MLflow UI: mlflow ui --backend-store-uri %s", metrics["tracking_uri"])
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from imagenet_ray.evaluate import EvalRequest, run_evaluation

    if args.resize is not None and args.crop is not None and args.crop > args.resize:
        raise ConfigError("evaluate: --crop must not exceed --resize")
    if args.num_workers < 1 or args.batch_size < 1:
        raise ConfigError("evaluate: --num-workers and --batch-size must be ≥ 1")
    req = EvalRequest(
        data_url=args.data,
        resize=args.resize,
        crop=args.crop,
        hflip=args.hflip,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        checkpoint=args.checkpoint,
        weights=args.weights,
        model=args.model,
        real_labels_url=args.real_labels,
        tracking_uri=args.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI"),
        experiment=args.experiment,
        storage_path=args.storage_path,
    )
    metrics = run_evaluation(req)
    line = (
        f"eval/top1={metrics['eval/top1']:.4f} eval/top5={metrics['eval/top5']:.4f} "
        f"on {int(metrics['eval/images'])} images"
    )
    if "eval/real_top1" in metrics:
        line += f"; ReaL top-1={metrics['eval/real_top1']:.4f} on {int(metrics['eval/real_images'])} images"
    log.info("%s", line)
    if metrics.get("mlflow_run_id"):
        log.info("mlflow run: %s", metrics["mlflow_run_id"])
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from imagenet_ray.predict import PredictRequest, run_predict

    if args.batch_size < 1:
        raise ConfigError("predict: --batch-size must be ≥ 1")
    req = PredictRequest(
        model=args.model,
        images=args.images,
        out=args.out,
        split=args.split,
        source=args.source,
        batch_size=args.batch_size,
        workers=args.workers,
        gpu=args.gpu,
        tracking_uri=args.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI"),
    )
    log.info("%s", run_predict(req).line())
    return 0


def _cmd_services(args: argparse.Namespace) -> int:
    from imagenet_ray import services

    state_dir = Path(args.dir)
    return {"up": services.up, "down": services.down, "status": services.status}[args.action](state_dir)


def _cmd_cluster(args: argparse.Namespace) -> int:
    from imagenet_ray.cluster import commands

    root = Path(args.root)
    if args.action == "up":
        return commands.up(
            root, Path(args.manifest), args.replicas, args.cpus, args.object_store_mb, args.loopback, args.cpu_limit
        )
    if args.action == "status":
        return commands.status(root, args.json)
    if args.action == "kill-node":
        if not args.host:
            raise UserError("cluster kill-node needs --host (e.g. decode-0)")
        return commands.kill_node(root, args.host, args.restart)
    if args.action == "drain-node":
        if not args.host:
            raise UserError("cluster drain-node needs --host (e.g. train-0)")
        return commands.drain_node(root, args.host, args.deadline)
    if args.action == "limit-cpu":
        if not args.host or args.cores is None:
            raise UserError("cluster limit-cpu needs --host and --cores (e.g. --host decode-0 --cores 0.5, or none)")
        return commands.limit_cpu(root, args.host, args.cores)
    return commands.down(root)


def _bench(
    module: str, add_args: str, run: str, parser: argparse.ArgumentParser
) -> Callable[[argparse.Namespace], int]:
    """Add a benchmark's arguments to its parser; import its module (and heavy deps) only when called."""
    import importlib

    mod = importlib.import_module(module)
    getattr(mod, add_args)(parser)
    return lambda args: int(getattr(mod, run)(args) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgParser(prog="imagenet-ray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_ArgParser)

    p = sub.add_parser("synth", help="write a miniature ImageNet in the real Kaggle CLS-LOC layout")
    p.add_argument("--out", required=True, help="URL or path (s3://, gs://, file://, path)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--train-per-class", type=int, default=50)
    p.add_argument("--val-per-class", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("prepare", help="ILSVRC layout → Parquet shards + _manifest.json (on Ray Data)")
    p.add_argument("--source", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--shard-mb", type=float, default=128.0, help="target shard size (MiB of source bytes)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shard plan (class mixing)")
    p.add_argument(
        "--layout",
        default=None,
        help="force a layout instead of detecting it: kaggle (CLS-LOC), "
        "folders (train|val/<wnid>/), devkit (flat val + devkit), tars (original tarballs)",
    )
    p.add_argument(
        "--max-quarantine-frac",
        type=float,
        default=0.001,
        help="fail when more than this fraction of images is quarantined",
    )
    p.add_argument("--max-side", type=int, default=None, help="re-encoded variant: longer side at most N px")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of the re-encoded variant")
    p.add_argument(
        "--mlflow-uri",
        default=None,
        help="log the report and manifest to MLflow as a dataset (default: MLFLOW_TRACKING_URI when set)",
    )
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("verify", help="re-read a prepared dataset and check counts and checksums")
    p.add_argument("url")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("train", help="train with Ray Train; log to MLflow")
    p.add_argument("--config", default=None, help="configs/NAME.yaml (default: embedded defaults)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="Top-1/Top-5 (+ per-class, ReaL) of a checkpoint or weights file")
    p.add_argument("--data", required=True, help="prepared dataset URL (its val split is used)")
    p.add_argument(
        "--checkpoint",
        default=None,
        help="checkpoint dir URL, runs:/RUN_ID[/best], models:/NAME@ALIAS or models:/NAME/VERSION",
    )
    p.add_argument("--weights", default=None, help="a torchvision state dict file (with --model)")
    p.add_argument("--model", default=None, help="torchvision model name (default: from the checkpoint)")
    p.add_argument(
        "--resize",
        type=int,
        default=None,
        help="shorter side before the center crop (default: the checkpoint config's eval.resize, else 256)",
    )
    p.add_argument(
        "--crop", type=int, default=None, help="center crop (default: the checkpoint config's eval.crop, else 224)"
    )
    p.add_argument("--hflip", action="store_true", help="average over the image and its mirror")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--real-labels", default=None, help="ImageNet-ReaL real.json (URL or path)")
    p.add_argument("--mlflow-uri", default=None, help="log the evaluation (default: MLFLOW_TRACKING_URI)")
    p.add_argument("--experiment", default="imagenet-ray-eval")
    p.add_argument("--storage-path", default=None, help="Ray Train result storage (a shared URL on a cluster)")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser(
        "predict",
        help="top-5 classes of every image (folder, ILSVRC layout or prepared dataset) → Parquet, on Ray Data",
        description="Batch inference on Ray Data. Writes Parquet under --out: one row per input image with key, "
        "top5_index, top5_wnid, top5_name, top5_prob; a file that does not decode is a row with its `error` and null "
        "predictions (rows = inputs, exactly). _SUCCESS (JSON: counts, files, model) is written last; the output "
        "is complete only when it exists.",
    )
    p.add_argument(
        "--model",
        required=True,
        help="a logged model (models:/NAME@ALIAS, models:/NAME/VERSION, models:/m-ID, runs:/ID/PATH, or a local "
        "directory with meta.json + weights.pt) or a training checkpoint (directory URL, or runs:/ID of a train run)",
    )
    p.add_argument(
        "--images",
        required=True,
        help="a prepared dataset (_manifest.json), a raw ILSVRC layout, or a folder of *.jpg/*.jpeg/*.png files "
        "(URL or path)",
    )
    p.add_argument("--out", required=True, help="where the Parquet goes (URL or path; new or empty)")
    p.add_argument(
        "--split",
        choices=["train", "val"],
        default=None,
        help="the split of a prepared dataset or ILSVRC layout (default: val); a plain folder has none",
    )
    p.add_argument(
        "--source",
        choices=["auto", "prepared", "raw", "folder"],
        default="auto",
        help="what --images is (default: detected; folder = every image file below it, even in an ILSVRC layout)",
    )
    p.add_argument("--batch-size", type=int, default=128, help="images per model call")
    p.add_argument(
        "--workers",
        "--concurrency",
        dest="workers",
        default=None,
        metavar="N|MIN:MAX",
        help="model actors, or a pool Ray Data grows from MIN to MAX (default: one per GPU; on CPU, the CPUs but one)",
    )
    p.add_argument(
        "--gpu",
        choices=["auto", "true", "false"],
        default="auto",
        help="one GPU per actor (auto: when the cluster has GPUs; true: also while GPU nodes autoscale from 0)",
    )
    p.add_argument("--mlflow-uri", default=None, help="resolves runs:/ and models:/ (default: MLFLOW_TRACKING_URI)")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("bench", help="benchmarks (results go to docs/benchmarks.md)")
    bench = p.add_subparsers(dest="bench", required=True, parser_class=_ArgParser)
    b = bench.add_parser("data", help="decode kernel per core and end-to-end ingest vs torch DataLoader")
    b.set_defaults(func=_bench("imagenet_ray.bench.data", "add_bench_data_args", "run_bench_data", b))
    b = bench.add_parser("prepare", help="prepare throughput vs a plain copy of the same bytes")
    b.set_defaults(func=_bench("imagenet_ray.bench.prepare_bench", "add_bench_prepare_args", "run_bench_prepare", b))
    b = bench.add_parser("train", help="Ray Train overhead vs a plain PyTorch loop (CPU)")
    b.set_defaults(func=_bench("imagenet_ray.bench.train_overhead", "add_bench_train_args", "run_bench_train", b))
    b = bench.add_parser("predict", help="predict on Ray Data vs a plain single-process loop (same model, cores)")
    b.set_defaults(func=_bench("imagenet_ray.bench.predict_bench", "add_bench_predict_args", "run_bench_predict", b))

    p = sub.add_parser("plan", help="decode cores and decode-group pods for N GPUs, from measured rates")
    p.set_defaults(func=_bench("imagenet_ray.capacity.command", "add_plan_args", "run_plan", p))

    p = sub.add_parser("services", help="local S3 server, MLflow server and Ray head on 127.0.0.1")
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("--dir", default=DEFAULT_SERVICES_DIR, help="state and data directory")
    p.set_defaults(func=_cmd_services)

    p = sub.add_parser("cluster", help="a multi-host Ray cluster of a RayCluster manifest's shape, on this machine")
    p.add_argument("action", choices=["up", "down", "status", "kill-node", "drain-node", "limit-cpu"])
    p.add_argument("--root", default=DEFAULT_CLUSTER_DIR, help="state, logs and service data")
    p.add_argument("--manifest", default="infra/k8s/base/raycluster.yaml", help="RayCluster (or built RayJob) YAML")
    p.add_argument("--replicas", action="append", default=[], metavar="GROUP=N", help="pods of a worker group")
    p.add_argument(
        "--cpus", action="append", default=[], metavar="GROUP=N", help="CPUs per node (default: min(manifest, cores))"
    )
    p.add_argument(
        "--cpu-limit",
        action="append",
        default=[],
        metavar="GROUP=CORES",
        help="a CPU quota per host of the group, as a pod's limits.cpu (e.g. decode=0.5; needs cgroups)",
    )
    p.add_argument("--object-store-mb", type=int, default=512, help="object store per node (the manifest's is capped)")
    p.add_argument("--loopback", action="store_true", help="127.0.0.x hosts instead of network namespaces")
    p.add_argument("--host", help="kill-node, drain-node, limit-cpu: the host (e.g. decode-0)")
    p.add_argument("--restart", action="store_true", help="kill-node: start it again, like a restarted pod")
    p.add_argument(
        "--deadline", type=int, default=60, help="drain-node: seconds until the preempted node is taken (default 60)"
    )
    p.add_argument("--cores", help="limit-cpu: the host's new CPU quota in cores, or none")
    p.add_argument("--json", action="store_true", help="status as JSON")
    p.set_defaults(func=_cmd_cluster)
    return parser


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    # The final one-line error is written directly: it must reach stderr even if logging is reconfigured.
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"imagenet-ray: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("imagenet-ray: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        # Ray wraps user errors raised inside tasks/workers; surface ours as one line.
        cause = _find_user_error(exc)
        if cause is None:
            raise
        print(f"imagenet-ray: error: {cause}", file=sys.stderr)
        return cause.exit_code


def _find_user_error(exc: BaseException) -> UserError | None:
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, UserError):
            return e
        stack.extend([e.__cause__, e.__context__, getattr(e, "cause", None)])
        # Ray's RayTaskError exposes the original exception through as_instanceof_cause()
        if hasattr(e, "as_instanceof_cause"):
            with contextlib.suppress(Exception):
                stack.append(e.as_instanceof_cause())
    return None


if __name__ == "__main__":
    sys.exit(main())
