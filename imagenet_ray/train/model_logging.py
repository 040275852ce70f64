"""After `fit()`: the final and the best checkpoint as MLflow logged models, and, when asked, the best
registered as a new version whose `champion` alias moves only on a better val/top1 (lifecycle/)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from imagenet_ray.lifecycle import log_classifier, promote_if_better, register
from imagenet_ray.tracking import RunSink, val_dataset, when_reachable
from imagenet_ray.train.checkpoint import read_checkpoint_url

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckpointChoice:
    """A checkpoint to log as a model: its name in the run, URL and val metrics."""

    name: str  # "final" or "best"
    url: str
    val_metrics: dict[str, float]


def choose_checkpoints(
    final: tuple[str, dict[str, Any]], best: list[tuple[str, dict[str, Any]]]
) -> list[CheckpointChoice]:
    """The final checkpoint, and the best by val/top1 when it is another one (ties: the later is final)."""

    def val(metrics: dict[str, Any]) -> dict[str, float]:
        return {k: float(metrics[k]) for k in ("val/top1", "val/top5") if k in metrics}

    chosen = [CheckpointChoice("final", final[0], val(final[1]))]
    if best:
        url, metrics = max(best, key=lambda b: float(b[1].get("val/top1", -1.0)))
        if url != final[0] and float(metrics.get("val/top1", -1.0)) > float(final[1].get("val/top1", -1.0)):
            chosen.append(CheckpointChoice("best", url, val(metrics)))
    return chosen


def log_models(
    sink: RunSink,
    choices: list[CheckpointChoice],
    *,
    wnids: list[str],
    data_url: str,
    manifest: dict[str, Any] | None,
    register_name: str | None,
) -> dict[str, str]:
    """Log each chosen checkpoint as a model of the run; register the best of them. Returns
    {"model_uri": ..., "model_version": ...} for what was logged (nothing fails the finished run)."""
    # The val set the numbers were measured on: the dataset training logged as its "val" input.
    val_name, val_digest = (val_dataset(data_url, manifest)[:2]) if manifest is not None else (None, None)
    out: dict[str, str] = {}
    logged: list[tuple[CheckpointChoice, str]] = []
    for choice in choices:
        state = read_checkpoint_url(choice.url)
        uri = when_reachable(
            lambda c=choice, s=state: log_classifier(  # type: ignore[misc]
                sink,
                s,
                name=c.name,
                wnids=wnids,
                val_metrics=c.val_metrics,
                dataset_digest=val_digest,
                dataset_name=val_name,
                checkpoint_url=c.url,
            ),
            f"the {choice.name} model",
        )
        if uri is not None:
            logged.append((choice, uri))
            log.info("logged model %s: %s (val/top1=%.4f)", choice.name, uri, choice.val_metrics.get("val/top1", 0))
    if not logged:
        return out
    best, best_uri = max(logged, key=lambda cu: cu[0].val_metrics.get("val/top1", -1.0))
    out["model_uri"] = best_uri
    if register_name:
        version = when_reachable(
            lambda: register(
                best_uri,
                register_name,
                tracking_uri=sink.tracking_uri,
                run_id=sink.run_id,
                val_top1=best.val_metrics.get("val/top1", 0.0),
                val_top5=best.val_metrics.get("val/top5", 0.0),
                dataset_digest=val_digest,
            ),
            f"registered model {register_name}",
        )
        if version is not None:
            out["model_version"] = f"models:/{register_name}/{version}"
            decision = promote_if_better(register_name, version, tracking_uri=sink.tracking_uri)
            log.info("%s", decision.line())
    return out
