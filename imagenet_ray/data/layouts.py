"""Find images and labels in an ILSVRC2012 layout: pure listing, no decoding.

Supported now: Kaggle's CLS-LOC layout
    LOC_synset_mapping.txt
    LOC_val_solution.csv                       ImageId,PredictionString (first token = wnid)
    ILSVRC/Data/CLS-LOC/train/<wnid>/<wnid>_<n>.JPEG
    ILSVRC/Data/CLS-LOC/val/ILSVRC2012_val_<8 digits>.JPEG
Keys are paths relative to the dataset root, so a listing is independent of where the root lives.
"""

from __future__ import annotations

import csv
import io
import posixpath
from dataclasses import dataclass

from imagenet_ray import storage
from imagenet_ray.data.classes import ClassList, parse_synset_mapping
from imagenet_ray.errors import UserError

KAGGLE_TRAIN_DIR = "ILSVRC/Data/CLS-LOC/train"
KAGGLE_VAL_DIR = "ILSVRC/Data/CLS-LOC/val"
KAGGLE_SYNSETS = "LOC_synset_mapping.txt"
KAGGLE_VAL_SOLUTION = "LOC_val_solution.csv"
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


@dataclass(frozen=True)
class ImageRecord:
    key: str  # path relative to the dataset root
    wnid: str
    label: int
    size: int  # bytes on storage


@dataclass(frozen=True)
class LayoutListing:
    layout: str
    root_url: str
    classes: ClassList
    train: tuple[ImageRecord, ...]
    val: tuple[ImageRecord, ...]

    def split(self, name: str) -> tuple[ImageRecord, ...]:
        return {"train": self.train, "val": self.val}[name]


def parse_val_solution(text: str, source: str = KAGGLE_VAL_SOLUTION) -> dict[str, str]:
    """ImageId → wnid from Kaggle's LOC_val_solution.csv (first token of PredictionString)."""
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None or [h.strip() for h in header[:2]] != ["ImageId", "PredictionString"]:
        raise UserError(f"{source}: expected header 'ImageId,PredictionString'")
    mapping: dict[str, str] = {}
    for lineno, row in enumerate(reader, 2):
        if not row:
            continue
        if len(row) < 2 or not row[1].split():
            raise UserError(f"{source}:{lineno}: missing prediction string")
        image_id, wnid = row[0].strip(), row[1].split()[0]
        if image_id in mapping:
            raise UserError(f"{source}:{lineno}: {image_id} listed twice")
        mapping[image_id] = wnid
    return mapping


def _is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_SUFFIXES)


def list_kaggle(root: storage.Location, files: dict[str, int]) -> LayoutListing:
    """Kaggle CLS-LOC listing from `files` (relative path → size)."""
    classes = parse_synset_mapping(storage.read_bytes(root.child(KAGGLE_SYNSETS)).decode(), KAGGLE_SYNSETS)
    train: list[ImageRecord] = []
    val_files: dict[str, tuple[str, int]] = {}
    train_prefix, val_prefix = KAGGLE_TRAIN_DIR + "/", KAGGLE_VAL_DIR + "/"
    for rel, size in files.items():
        if not _is_image(rel):
            continue
        if rel.startswith(train_prefix):
            parts = rel[len(train_prefix):].split("/")
            if len(parts) != 2:
                raise UserError(f"{root.url}: unexpected train path {rel} (expected train/<wnid>/<file>)")
            wnid = parts[0]
            train.append(ImageRecord(rel, wnid, classes.label_of(wnid), size))
        elif rel.startswith(val_prefix):
            image_id = posixpath.splitext(posixpath.basename(rel))[0]
            val_files[image_id] = (rel, size)
    solution = parse_val_solution(storage.read_bytes(root.child(KAGGLE_VAL_SOLUTION)).decode())
    missing = sorted(set(val_files) - set(solution))
    if missing:
        raise UserError(f"{KAGGLE_VAL_SOLUTION}: no label for val image {missing[0]} ({len(missing)} unlabeled)")
    absent = sorted(set(solution) - set(val_files))
    if absent:
        raise UserError(f"{root.url}: val image {absent[0]} is in {KAGGLE_VAL_SOLUTION} but not on storage "
                        f"({len(absent)} missing)")
    val = [ImageRecord(rel, solution[i], classes.label_of(solution[i]), size) for i, (rel, size) in val_files.items()]
    train.sort(key=lambda r: r.key)
    val.sort(key=lambda r: r.key)
    return LayoutListing("kaggle", root.url, classes, tuple(train), tuple(val))


def detect_and_list(root_url: str) -> LayoutListing:
    """List a dataset root, detect its layout, return every image with its label."""
    root = storage.resolve(root_url)
    infos = storage.list_files(root)
    if not infos:
        raise UserError(f"{root_url}: nothing found there (missing or empty prefix)")
    base = root.path.rstrip("/") + "/"
    files = {i.path[len(base):] if i.path.startswith(base) else i.path: i.size for i in infos}
    if KAGGLE_SYNSETS in files and any(k.startswith(KAGGLE_TRAIN_DIR + "/") for k in files):
        return list_kaggle(root, files)
    top = sorted({k.split("/")[0] for k in files})[:8]
    raise UserError(
        f"{root_url}: no known ILSVRC layout (found {len(files)} files; top level: {', '.join(top)}); "
        f"expected Kaggle CLS-LOC: {KAGGLE_SYNSETS}, {KAGGLE_VAL_SOLUTION}, {KAGGLE_TRAIN_DIR}/<wnid>/, {KAGGLE_VAL_DIR}/"
    )
