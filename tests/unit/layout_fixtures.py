"""Builders for the tests of layouts.py: one tiny ImageNet written in every supported layout.

Everything is generated (PIL JPEGs, tarfile, scipy.io.savemat); nothing is read from real data.
Usable outside pytest too, e.g. to build a tarball layout for an end-to-end `imagenet-ray prepare`:

    python tests/unit/layout_fixtures.py /tmp/mini-tars tars
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from imagenet_ray.data.classes import imagenet_classes

# Not the first 4 sorted wnids; two classes are both named "crane". Sorted: brambling, crane (bird),
# kit fox, crane (machine).
WNIDS = ("n02119789", "n02012849", "n03126707", "n01530575")
SORTED_WNIDS = tuple(sorted(WNIDS))
# The devkit's ILSVRC2012_ID order is not the sorted-wnid order (ID 1 is n02119789 in the real one).
DEVKIT_IDS = {"n02119789": 1, "n03126707": 2, "n01530575": 3, "n02012849": 4}
NON_LEAF = (1001, "n00001740", "entity", 5)  # an inner node of the hierarchy: ID > 1000, children > 0
# A member name over 100 characters: needs GNU or PAX long-name headers in a tar.
LONG_NAME = "n02119789_" + "a_rather_long_file_name_" * 5 + "1.JPEG"


def jpeg(seed: int, size: tuple[int, int] = (36, 28)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def val_name(number: int) -> str:
    return f"ILSVRC2012_val_{number:08d}.JPEG"


@dataclass
class MiniImageNet:
    train: dict[str, dict[str, bytes]]  # wnid → {file name: bytes}
    val: dict[int, tuple[str, bytes]]  # val image number (1-based) → (wnid, bytes)

    @property
    def names(self) -> dict[str, str]:
        known = imagenet_classes()
        return {w: known.names[known.index[w]] for w in self.train}

    def original(self, basename: str) -> bytes:
        """The bytes written for an image, by its file name."""
        for files in self.train.values():
            if basename in files:
                return files[basename]
        for number, (_, data) in self.val.items():
            if val_name(number) == basename:
                return data
        raise KeyError(basename)


def mini_imagenet(train_per_class: int = 3, val_per_class: int = 2, long_name: bool = True) -> MiniImageNet:
    train = {}
    for c, wnid in enumerate(WNIDS):
        train[wnid] = {f"{wnid}_{100 + 7 * n}.JPEG": jpeg(c * 100 + n) for n in range(train_per_class)}
    if long_name:
        train[WNIDS[0]][LONG_NAME] = jpeg(999)
    # Val numbers interleave the classes in a scrambled order.
    pairs = [w for _ in range(val_per_class) for w in WNIDS]
    order = np.random.default_rng(7).permutation(len(pairs))
    val = {i + 1: (pairs[int(j)], jpeg(5000 + i)) for i, j in enumerate(order)}
    return MiniImageNet(train, val)


def put(root: Path, rel: str, data: bytes | str) -> Path:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data.encode() if isinstance(data, str) else data)
    return p


def synset_mapping(ds: MiniImageNet) -> str:
    """LOC_synset_mapping.txt, deliberately not in sorted order."""
    return "".join(f"{w} {ds.names[w]}\n" for w in WNIDS)


# --- kaggle / folders -------------------------------------------------------------------------------------------


def write_kaggle(root: Path, ds: MiniImageNet) -> Path:
    put(root, "LOC_synset_mapping.txt", synset_mapping(ds))
    for wnid, files in ds.train.items():
        for name, data in files.items():
            put(root, f"ILSVRC/Data/CLS-LOC/train/{wnid}/{name}", data)
    rows = ["ImageId,PredictionString"]
    for number, (wnid, data) in ds.val.items():
        put(root, f"ILSVRC/Data/CLS-LOC/val/{val_name(number)}", data)
        rows.append(f"{val_name(number).removesuffix('.JPEG')},{wnid} 1 2 30 20 ")
    put(root, "LOC_val_solution.csv", "\n".join(rows) + "\n")
    return root


def write_train_folders(root: Path, ds: MiniImageNet) -> None:
    for wnid, files in ds.train.items():
        for name, data in files.items():
            put(root, f"train/{wnid}/{name}", data)


def write_folders(root: Path, ds: MiniImageNet, mapping: bool = False) -> Path:
    """torchvision ImageFolder layout, as valprep.sh leaves it."""
    write_train_folders(root, ds)
    for number, (wnid, data) in ds.val.items():
        put(root, f"val/{wnid}/{val_name(number)}", data)
    if mapping:
        put(root, "LOC_synset_mapping.txt", synset_mapping(ds))
    return root


# --- devkit -----------------------------------------------------------------------------------------------------


def meta_mat(ds: MiniImageNet, ids: dict[str, int] = DEVKIT_IDS, non_leaf: bool = True) -> bytes:
    """The devkit's meta.mat: a struct array `synsets` as in the real file, rows in ID order."""
    import scipy.io

    fields = [
        "ILSVRC2012_ID",
        "WNID",
        "words",
        "gloss",
        "num_children",
        "children",
        "wordnet_height",
        "num_train_images",
    ]
    rows = [
        (float(i), w, ds.names.get(w, w), f"gloss of {w}", 0.0, np.zeros((1, 0)), 0.0, float(len(ds.train.get(w, {}))))
        for w, i in sorted(ids.items(), key=lambda kv: kv[1])
    ]
    if non_leaf:
        i, w, words, n = NON_LEAF
        rows.append((float(i), w, words, "the root", float(n), np.arange(1.0, n + 1).reshape(1, -1), 9.0, 0.0))
    synsets = np.empty((len(rows), 1), dtype=[(f, object) for f in fields])
    for k, row in enumerate(rows):
        synsets[k, 0] = row
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"synsets": synsets})
    return buf.getvalue()


def ground_truth(ds: MiniImageNet, ids: dict[str, int] = DEVKIT_IDS, extra_lines: int = 0) -> str:
    lines = [str(ids[ds.val[n][0]]) for n in sorted(ds.val)] + ["1"] * extra_lines
    return "\n".join(lines) + "\n"


def devkit_targz(ds: MiniImageNet, **kwargs) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in (
            ("COPYING", b"license"),
            ("readme.txt", b"devkit"),
            ("data/meta.mat", meta_mat(ds)),
            ("data/ILSVRC2012_validation_ground_truth.txt", ground_truth(ds, **kwargs).encode()),
        ):
            _add(tf, f"ILSVRC2012_devkit_t12/{name}", data)
    return buf.getvalue()


def write_devkit_files(root: Path, ds: MiniImageNet, where: str = "targz") -> None:
    """The devkit as the original .tar.gz ("targz"), extracted ("dir"), or its two files at the root ("root")."""
    if where == "targz":
        put(root, "ILSVRC2012_devkit_t12.tar.gz", devkit_targz(ds))
        return
    prefix = {"dir": "ILSVRC2012_devkit_t12/data/", "root": ""}[where]
    put(root, prefix + "meta.mat", meta_mat(ds))
    put(root, prefix + "ILSVRC2012_validation_ground_truth.txt", ground_truth(ds))
    if where == "dir":
        put(root, "ILSVRC2012_devkit_t12/readme.txt", "devkit")


def write_devkit(
    root: Path, ds: MiniImageNet, devkit: str = "targz", val_at_root: bool = False, train: str = "folders"
) -> Path:
    """Flat val images (val/ or the root) + the devkit; train as folders, the train tar, or per-class tars."""
    write_devkit_files(root, ds, devkit)
    for number, (_, data) in ds.val.items():
        put(root, ("" if val_at_root else "val/") + val_name(number), data)
    write_train(root, ds, train)
    return root


# --- tarballs ---------------------------------------------------------------------------------------------------


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 1_300_000_000
    tf.addfile(info, io.BytesIO(data))


def class_tar(files: dict[str, bytes], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for name, data in files.items():
            _add(tf, name, data)
    return buf.getvalue()


def train_tar(ds: MiniImageNet) -> bytes:
    """ILSVRC2012_img_train.tar: one inner <wnid>.tar per class (inner formats alternate GNU / PAX)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for k, (wnid, files) in enumerate(ds.train.items()):
            fmt = (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT)[k % 2]
            _add(tf, f"{wnid}.tar", class_tar(files, fmt))
    return buf.getvalue()


def val_tar(ds: MiniImageNet) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for number in sorted(ds.val):
            _add(tf, val_name(number), ds.val[number][1])
    return buf.getvalue()


def write_train(root: Path, ds: MiniImageNet, how: str) -> None:
    """Train as class folders ("folders"), ILSVRC2012_img_train.tar ("tar") or train/<wnid>.tar ("class_tars")."""
    if how == "folders":
        write_train_folders(root, ds)
    elif how == "tar":
        put(root, "ILSVRC2012_img_train.tar", train_tar(ds))
    elif how == "class_tars":
        for wnid, files in ds.train.items():
            put(root, f"train/{wnid}.tar", class_tar(files))
    else:
        raise ValueError(how)


def write_tars(root: Path, ds: MiniImageNet, devkit: str = "targz") -> Path:
    """The original downloads as they are: both tarballs and the devkit tarball."""
    put(root, "ILSVRC2012_img_train.tar", train_tar(ds))
    put(root, "ILSVRC2012_img_val.tar", val_tar(ds))
    write_devkit_files(root, ds, devkit)
    return root


WRITERS = {"kaggle": write_kaggle, "folders": write_folders, "devkit": write_devkit, "tars": write_tars}


if __name__ == "__main__":
    import sys

    out, layout = Path(sys.argv[1]), sys.argv[2]
    per_class = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    WRITERS[layout](out, mini_imagenet(train_per_class=per_class, val_per_class=max(2, per_class // 3)))
    print(f"wrote a {layout} layout to {out}")
