"""`imagenet-ray` command line: synth | prepare | train | services.

Every command turns a user error into one line on stderr and a non-zero exit (2 for bad config or
arguments, 1 for everything else); tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from imagenet_ray.errors import ConfigError, UserError

DEFAULT_SERVICES_DIR = ".services"


class _ArgParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's default prints usage + exits 2; keep it one line
        raise ConfigError(f"{self.prog}: {message}")


def _cmd_synth(args: argparse.Namespace) -> int:
    from imagenet_ray.data.synth import write_synthetic_imagenet

    summary = write_synthetic_imagenet(args.out, args.classes, args.train_per_class, args.val_per_class, args.seed)
    print(f"wrote {summary.train_images} train + {summary.val_images} val images of {summary.classes} classes "
          f"to {summary.url} (Kaggle CLS-LOC layout)")
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from imagenet_ray.data.layouts import detect_and_list
    from imagenet_ray.data.prepare import PrepareOptions, prepare
    from imagenet_ray.train.trainer import absolute_url, ensure_ray

    if args.shard_mb <= 0:
        raise ConfigError("prepare: --shard-mb must be > 0")
    source, out = absolute_url(args.source), absolute_url(args.out)
    detect_and_list(source)  # fail on a bad source before starting Ray
    ensure_ray(1)
    manifest = prepare(source, out, PrepareOptions(shard_mb=args.shard_mb, seed=args.seed))
    for split, info in manifest["splits"].items():
        print(f"{split}: {info['num_images']} images in {len(info['shards'])} shards")
    print(f"prepared {len(manifest['classes'])} classes from {source} ({manifest['source']['layout']} layout) "
          f"to {out} in {manifest['wall_seconds']:.1f} s")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from imagenet_ray.config import load_config
    from imagenet_ray.train.trainer import run_training

    cfg = load_config(args.config, args.overrides)
    metrics = run_training(cfg)
    print(f"final: val/top1={metrics.get('val/top1', float('nan')):.4f} "
          f"val/top5={metrics.get('val/top5', float('nan')):.4f} "
          f"(epoch {metrics.get('epoch')}, {int(metrics.get('val/images', 0))} val images)")
    print(f"mlflow run: {metrics.get('mlflow_run_id')} in {metrics['tracking_uri']}")
    if metrics.get("checkpoint_path"):
        print(f"checkpoint: {metrics['checkpoint_path']}")
    if metrics["tracking_uri"].startswith("sqlite:///"):
        print(f"open the MLflow UI: mlflow ui --backend-store-uri {metrics['tracking_uri']}")
    return 0


def _cmd_services(args: argparse.Namespace) -> int:
    from imagenet_ray import services

    state_dir = Path(args.dir)
    return {"up": services.up, "down": services.down, "status": services.status}[args.action](state_dir)


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
    p.add_argument("--shard-mb", type=float, default=128.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("train", help="train with Ray Train; log to MLflow")
    p.add_argument("--config", default=None, help="configs/NAME.yaml (default: embedded defaults)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("services", help="local S3 server, MLflow server and Ray head on 127.0.0.1")
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("--dir", default=DEFAULT_SERVICES_DIR, help="state and data directory")
    p.set_defaults(func=_cmd_services)
    return parser


def main(argv: list[str] | None = None) -> int:
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
    seen = set()
    stack = [exc]
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
            try:
                stack.append(e.as_instanceof_cause())
            except Exception:
                pass
    return None


if __name__ == "__main__":
    sys.exit(main())
