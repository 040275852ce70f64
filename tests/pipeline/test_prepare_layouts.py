"""Conservation for every layout, through the real prepare on a local Ray: input images = written +
quarantined, no key twice, every stored image byte-identical to its source (tar members included)."""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from imagenet_ray.data.prepare import PrepareOptions, prepare

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
import layout_fixtures as lf

pytestmark = pytest.mark.ray


@pytest.mark.parametrize("layout", ["kaggle", "folders", "devkit", "tars"])
def test_every_layout_conserves_every_image(local_ray, tmp_path, layout):
    ds = lf.mini_imagenet()
    root = {"kaggle": lf.write_kaggle, "folders": lf.write_folders, "devkit": lf.write_devkit, "tars": lf.write_tars}[
        layout
    ](tmp_path / "raw", ds)
    broken = 0
    if layout != "tars":  # a truncated JPEG among the train images of a file-based layout
        folder = next(
            p
            for p in (Path(root)).rglob("*")
            if p.is_dir() and p.name == lf.SORTED_WNIDS[0] and "train" in p.as_posix()
        )
        (folder / f"{lf.SORTED_WNIDS[0]}_broken.JPEG").write_bytes(lf.jpeg(99)[:120])
        broken = 1
    result = prepare(str(root), str(tmp_path / "out"), PrepareOptions(shard_mb=0.01, max_quarantine_frac=0.5))
    assert result.ok, result.problems
    assert result.report["layout"] == layout
    train = result.report["splits"]["train"]
    assert train["quarantined"] == broken
    for split, s in result.report["splits"].items():
        assert s["listed"] == s["written"] + s["quarantined"], split
    keys = []
    for split in ("train", "val"):
        for shard in result.manifest["splits"][split]["shards"]:
            for row in pq.read_table(tmp_path / "out" / shard["path"]).to_pylist():
                keys.append(row["key"])
                assert row["image"] == ds.original(row["key"].rsplit("/", 1)[-1]), row["key"]
                assert result.manifest["classes"][row["label"]] == row["wnid"]
    assert len(keys) == len(set(keys)) == sum(s["written"] for s in result.report["splits"].values())
    assert result.manifest["classes"] == list(lf.SORTED_WNIDS)
