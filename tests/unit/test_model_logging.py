"""Which checkpoints become MLflow models, and the run's reproducibility tags."""

from __future__ import annotations

import subprocess

from imagenet_ray.config import ExperimentConfig
from imagenet_ray.train import provenance
from imagenet_ray.train.model_logging import choose_checkpoints


def test_final_always_and_best_only_when_it_is_another_better_checkpoint():
    final = ("s3://c/run/checkpoint_2", {"val/top1": 0.6, "val/top5": 0.9, "epoch": 2})
    better = ("s3://c/run/checkpoint_1", {"val/top1": 0.7, "val/top5": 0.95})
    chosen = choose_checkpoints(final, [better, final])
    assert [(c.name, c.url) for c in chosen] == [("final", final[0]), ("best", better[0])]
    assert chosen[0].val_metrics == {"val/top1": 0.6, "val/top5": 0.9}  # only what describes the weights
    assert [c.name for c in choose_checkpoints(final, [final])] == ["final"]  # the final one is the best
    worse = ("s3://c/run/checkpoint_0", {"val/top1": 0.5})
    assert [c.name for c in choose_checkpoints(final, [worse, final])] == ["final"]
    tie = ("s3://c/run/checkpoint_1", {"val/top1": 0.6})
    assert [c.name for c in choose_checkpoints(final, [tie])] == ["final"]  # a tie: the final one
    assert [c.name for c in choose_checkpoints(final, [])] == ["final"]


def test_git_commit_prefers_the_image_and_marks_a_dirty_checkout(monkeypatch):
    monkeypatch.setenv(provenance.GIT_COMMIT_ENV, "abc123")
    assert provenance.git_commit() == "abc123"
    monkeypatch.setenv(provenance.GIT_COMMIT_ENV, "unknown")  # an image built without the build arg
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    commit = provenance.git_commit()
    assert commit is None or commit.split("-")[0] == head


def test_reproducibility_tags_name_versions_and_the_cluster(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 48.0, "GPU": 8.0})
    nodes = [
        {"Alive": True, "Resources": {"CPU": 16.0, "GPU": 8.0}},
        {"Alive": True, "Resources": {"CPU": 32.0}},
        {"Alive": False, "Resources": {"CPU": 32.0}},
    ]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    monkeypatch.setenv(provenance.GIT_COMMIT_ENV, "deadbeef")
    tags = provenance.reproducibility_tags(ExperimentConfig.model_validate({"train": {"num_workers": 8}}), True)
    assert tags["mlflow.source.git.commit"] == "deadbeef"
    assert tags["imagenet_ray.versions.torch"].startswith("2.14.1")
    assert tags["imagenet_ray.cluster.nodes"] == "2" and tags["imagenet_ray.cluster.gpu_nodes"] == "1"
    assert tags["imagenet_ray.cluster.cpu_only_nodes"] == "1" and tags["imagenet_ray.cluster.gpus"] == "8"
    assert tags["imagenet_ray.train.workers"] == "8" and tags["imagenet_ray.train.gpus_per_worker"] == "1"
