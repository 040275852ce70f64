"""A flipped byte in a shard's page, read on a local Ray through the project's reader: an error naming the shard
and the checksum (Ray Data's own read of the same bytes succeeds with a different image)."""

import shutil

import pyarrow.parquet as pq
import pytest

from imagenet_ray.data.format import check_shard_sizes, open_prepared
from imagenet_ray.data.pipeline import build_train_dataset
from imagenet_ray.errors import UserError

pytestmark = pytest.mark.ray


@pytest.fixture
def corrupted(prepared, tmp_path):
    """A copy of the prepared dataset with one bit flipped in the middle of one image of one train shard
    (the image column is stored uncompressed: its bytes lie in a data page as they are)."""
    root, manifest = prepared
    copy = tmp_path / "prepared"
    shutil.copytree(root, copy)
    shard = copy / manifest["splits"]["train"]["shards"][1]["path"]
    data = bytearray(shard.read_bytes())
    image = pq.read_table(shard, columns=["image"]).column("image")[3].as_py()
    start = data.find(image)
    assert start > 0 and data.find(image, start + 1) == -1
    data[start + len(image) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    return copy, shard, image


def test_without_verification_the_flip_passes_silently(local_ray, corrupted):
    import ray.data

    _, shard, image = corrupted
    images = ray.data.read_parquet(str(shard)).select_columns(["image"]).take_all()
    assert len(images) > 3 and images[3]["image"] != image  # another image, no error


def test_a_corrupt_page_fails_the_read_naming_the_shard(local_ray, corrupted):
    copy, shard, _ = corrupted
    data = open_prepared(str(copy))
    check_shard_sizes(data)  # same size: the pre-flight check cannot see it, the read must
    with pytest.raises(UserError) as err:  # Ray re-raises it as RayTaskError(UserError)
        for _ in build_train_dataset(data, crop=16, seed=1).iter_batches(batch_size=None):
            pass
    # str() of Ray's error is the remote traceback; its cause is the worker's UserError, one line.
    message = str(getattr(err.value, "cause", err.value))
    assert message.startswith(
        f"{shard}: corrupt shard (could not verify page integrity, CRC checksum verification failed for page_ordinal"
    )
    assert "\n" not in message and "Failed to reading batches" not in message
    assert f"{shard}: corrupt shard" in str(err.value)  # the traceback text names it too
    # The val split (intact) still reads.
    assert data.read("val", ["label"]).count() == data.num_images("val")


def test_a_read_task_of_several_shards_names_the_corrupt_one(local_ray, corrupted):
    from imagenet_ray.data.shard_reader import read_shards

    copy, shard, _ = corrupted
    data = open_prepared(str(copy))
    fs, paths = data.shard_paths("train")
    assert len(paths) >= 2
    ds = read_shards(paths, fs, data.shard_urls("train"), data.url, None, override_num_blocks=1)  # one task
    with pytest.raises(UserError) as err:
        ds.take_all()
    assert str(getattr(err.value, "cause", err.value)).startswith(f"{shard}: corrupt shard (could not verify page")
