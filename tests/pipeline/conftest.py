"""Local-Ray layer: a Ray instance started in this process, and a small prepared dataset."""

import pytest


@pytest.fixture(scope="package")
def local_ray():
    import ray

    # Our own local instance (never an existing cluster): training workers + decode tasks on 2 cores.
    from imagenet_ray.runtime import start_local_ray

    start_local_ray(num_cpus=4, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synth_raw(tmp_path_factory):
    from imagenet_ray.data.synth import write_synthetic_imagenet

    out = tmp_path_factory.mktemp("raw")
    # 21 val images: odd on purpose, so splitting across 2 workers is uneven.
    summary = write_synthetic_imagenet(str(out), num_classes=3, train_per_class=12, val_per_class=7, seed=1)
    return out, summary


@pytest.fixture(scope="package")
def prepared(local_ray, synth_raw, tmp_path_factory):
    from imagenet_ray.data.prepare import PrepareOptions, prepare

    raw, _ = synth_raw
    out = tmp_path_factory.mktemp("prepared")
    result = prepare(str(raw), str(out), PrepareOptions(shard_mb=0.5, seed=3))
    assert result.ok, result.problems
    return out, result.manifest
