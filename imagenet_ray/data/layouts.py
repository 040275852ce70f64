"""Find images and labels in an ILSVRC2012 download, whatever its form: pure listing, no decoding.

Layouts kaggle, folders, devkit, tars (auto-detected; `prepare --layout NAME` forces one; LAYOUT_HELP
says what each expects; docs/architecture.md shows the trees). Keys are paths relative to the dataset
root ("<tar>/<member>" inside tars); labels are indices into the dataset's sorted wnids.
"""

from __future__ import annotations

import csv
import io
import posixpath
import re
import struct
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple, cast

import pyarrow as pa
import pyarrow.fs as pafs

from imagenet_ray import storage
from imagenet_ray.data.classes import WNID_RE, ClassList, imagenet_classes, parse_synset_mapping
from imagenet_ray.errors import UserError, describe_error

KAGGLE_TRAIN_DIR = "ILSVRC/Data/CLS-LOC/train"
KAGGLE_VAL_DIR = "ILSVRC/Data/CLS-LOC/val"
KAGGLE_SYNSETS = "LOC_synset_mapping.txt"
KAGGLE_VAL_SOLUTION = "LOC_val_solution.csv"
TRAIN_DIR = "train"
VAL_DIR = "val"
TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
DEVKIT_DIR = "ILSVRC2012_devkit_t12"
DEVKIT_TARGZ = "ILSVRC2012_devkit_t12.tar.gz"
DEVKIT_META = "meta.mat"
DEVKIT_GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
# Files in image folders with these suffixes (or hidden non-images such as .DS_Store) are skipped.
METADATA_SUFFIXES = (".txt", ".csv", ".mat", ".xml", ".json", ".md", ".sh", ".tar.gz", ".tgz", ".db")
# [0-9], not \d: \d matches any script's digits, and int() reads them (ILSVRC2012_val_٠٠٠٠٠٠٠١ would be image 1).
VAL_NAME_RE = re.compile(r"^ILSVRC2012_val_([0-9]{8})\.[A-Za-z]+\Z")
VAL_ID_RE = re.compile(r"ILSVRC2012_val_([0-9]{8})")  # anywhere in a key (inside tars and folders too)
LIST_WORKERS = 64  # concurrent listing requests / tar indexers
TAR_READAHEAD = 8192  # bytes read per tar header (a header, plus GNU/PAX long-name blocks)

_DEVKIT_HELP = f"devkit ({DEVKIT_TARGZ}, or {DEVKIT_META} + {DEVKIT_GROUND_TRUTH} in {DEVKIT_DIR}/data/ or at the root)"
_TRAIN_HELP = f"train/<wnid>/*.JPEG (or train/<wnid>.tar, or {TRAIN_TAR})"
LAYOUT_HELP = {  # name → what it expects, one line (error messages, `--layout` help)
    "kaggle": (
        f"Kaggle CLS-LOC: {KAGGLE_SYNSETS}, {KAGGLE_VAL_SOLUTION}, {KAGGLE_TRAIN_DIR}/<wnid>/*.JPEG, "
        f"{KAGGLE_VAL_DIR}/*.JPEG"
    ),
    "folders": f"class folders (ImageFolder/valprep.sh): {_TRAIN_HELP}, val/<wnid>/*.JPEG, optional {KAGGLE_SYNSETS}",
    "devkit": f"flat val/ILSVRC2012_val_<8 digits>.JPEG (or at the root) + {_DEVKIT_HELP}; {_TRAIN_HELP}",
    "tars": f"original tarballs: {TRAIN_TAR} (or train/<wnid>/), {VAL_TAR}, {_DEVKIT_HELP}",
}
LAYOUTS = tuple(LAYOUT_HELP)  # names accepted by `prepare --layout`


@dataclass(frozen=True)
class ImageRecord:
    """One source image. `key` is unique within a dataset and names where the image came from."""

    key: str  # path relative to the dataset root; for a tar member "<tar path>/<member path>"
    wnid: str
    label: int
    size: int  # bytes of the encoded image
    path: str = ""  # object holding the bytes, relative to the root ("" = the key itself)
    offset: int = -1  # byte offset of the image inside `path` (tar members); -1 = the whole object

    @property
    def object_path(self) -> str:
        return self.path or self.key


def val_index_of(key: str) -> int:
    """0-based ILSVRC2012 val index from a source key, or -1."""
    match = VAL_ID_RE.search(key)
    return int(match.group(1)) - 1 if match else -1


def read_record(root: storage.Location, rec: ImageRecord) -> bytes:
    """The encoded bytes of one image, whole object or a byte range of a tar (no unpacking)."""
    loc = root.child(rec.object_path)
    if rec.offset < 0:
        return storage.read_bytes(loc)
    try:
        with loc.fs.open_input_file(loc.path) as f:
            return cast(bytes, f.read_at(rec.size, rec.offset))
    except OSError as exc:
        raise UserError(storage.describe_os_error(loc.url, exc)) from None


def read_records(root: storage.Location, records: Iterable[ImageRecord]) -> Iterator[bytes]:
    """The bytes of each record, in order; consecutive tar members of one tar share one open file."""
    open_path: str | None = None
    handle: pa.NativeFile | None = None
    try:
        for rec in records:
            if rec.offset < 0:
                yield read_record(root, rec)
                continue
            loc = root.child(rec.object_path)
            try:
                if open_path != rec.object_path:
                    if handle is not None:
                        handle.close()
                        handle, open_path = None, None
                    handle = loc.fs.open_input_file(loc.path)
                    open_path = rec.object_path
                assert handle is not None
                data = handle.read_at(rec.size, rec.offset)
            except OSError as exc:
                raise UserError(storage.describe_os_error(loc.url, exc)) from None
            yield data
    finally:
        if handle is not None:
            handle.close()


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
    mapping: dict[str, str] = {}
    try:
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["ImageId", "PredictionString"]:
            raise UserError(f"{source}: expected header 'ImageId,PredictionString'")
        for lineno, row in enumerate(reader, 2):
            if not row:
                continue
            if len(row) < 2 or not row[1].split():
                raise UserError(f"{source}:{lineno}: missing prediction string")
            image_id, wnid = row[0].strip(), row[1].split()[0]
            if image_id in mapping:
                shown = image_id if image_id.isprintable() else repr(image_id)  # a quoted ID may hold a newline
                raise UserError(f"{source}:{lineno}: {shown} listed twice")
            mapping[image_id] = wnid
    except csv.Error as exc:  # e.g. a lone \r inside an unquoted field
        raise UserError(f"{source}:{reader.line_num}: not readable as CSV ({exc})") from None
    return mapping


def _mat_int(value: object, source: str, index: int, field: str) -> int:
    """A whole-number field of the devkit's synsets(index) (MATLAB stores them as doubles), else a UserError."""
    import numpy as np

    number = np.asarray(value)
    # int() raises on strings and arrays, and reads 1.5 as 1: the ground truth would name the wrong class.
    if number.ndim == 0 and number.dtype.kind in "iuf" and np.isfinite(number) and number == np.round(number):
        return int(number)
    shown = " ".join(repr(value).split())[:60]
    raise UserError(f"{source}: synsets({index}).{field} is {shown}, not a whole number")


def _mat_text(value: object, source: str, index: int, field: str) -> str:
    """A char field of synsets(index): scipy gives a str, or an empty array for '' (whose str() is "[]")."""
    import numpy as np

    if isinstance(value, str):
        return value
    if isinstance(value, np.ndarray) and value.size == 0:
        return ""
    shown = " ".join(repr(value).split())[:60]
    raise UserError(f"{source}: synsets({index}).{field} is {shown}, not text")


_MAT_DATA_TYPES = frozenset({1, 2, 3, 4, 5, 6, 7, 9, 12, 13, 16, 17, 18})  # the type codes scipy has a dtype for
_MAT_CLASSES = frozenset({1, 2, 4, *range(6, 16)})  # cell, struct, char, numeric: all a meta.mat holds
_MAT_MATRIX, _MAT_COMPRESSED = 14, 15
MAT_MAX_INFLATED = 64 << 20  # bytes the compressed variables of a meta.mat may inflate to (the real one: < 1 MB)


class _MatWalk:
    """Retraces scipy's MAT v5 reader up to and through the variable `synsets`, checking every type code that
    scipy uses unchecked as an index into a C table: on an unknown one scipy 1.17 crashes the process
    (SIGSEGV), and one flipped byte in meta.mat is enough (scipy PRs 25349, 25829). Like scipy, reads within
    a variable follow one another and ignore the byte counts of the matrices that hold them."""

    def __init__(self, source: str, order: str) -> None:
        self.source, self.order = source, order

    def fail(self, problem: str) -> UserError:
        return UserError(f"{self.source}: not a readable MATLAB file ({problem})")

    def element(self, buf: bytes, pos: int) -> tuple[int, bytes, int]:
        """(type code, data, position after) of the data element at `pos`."""
        if pos + 8 > len(buf):
            raise self.fail(f"truncated at byte {pos}")
        mdtype, count = struct.unpack_from(self.order + "II", buf, pos)
        if mdtype >> 16:  # small data element: count and type in the first 4 bytes, the data in the next 4
            if mdtype >> 16 > 4:
                raise self.fail(f"bad small data element at byte {pos}")
            return mdtype & 0xFFFF, buf[pos + 4 : pos + 4 + (mdtype >> 16)], pos + 8
        if pos + 8 + count > len(buf):
            raise self.fail(f"truncated at byte {pos}")
        return mdtype, buf[pos + 8 : pos + 8 + count], pos + 8 + -(-count // 8) * 8  # padded to 8 bytes

    def int8_string(self, buf: bytes, pos: int) -> tuple[bytes, int]:
        mdtype, data, pos = self.element(buf, pos)
        if mdtype not in (1, 16):  # miINT8 (or miUTF8)
            raise self.fail(f"expected a name at byte {pos}")
        return data, pos

    def header(self, buf: bytes, pos: int) -> tuple[int, bool, list[int], bytes, int]:
        """(class, complex, dims, name, position after) of the array whose miMATRIX tag ends at `pos`."""
        if pos + 16 > len(buf):
            raise self.fail(f"truncated at byte {pos}")
        flags = struct.unpack_from(self.order + "I", buf, pos + 8)[0]
        mclass, is_complex = flags & 0xFF, bool(flags >> 11 & 1)
        if mclass == 17:  # mxOPAQUE: a name, nothing else in the header
            name, pos = self.int8_string(buf, pos + 16)
            return mclass, is_complex, [], name, pos
        mdtype, data, pos = self.element(buf, pos + 16)
        if mdtype not in (5, 6) or len(data) > 128:  # miINT32/miUINT32, at most 32 of them
            raise self.fail(f"bad dimensions before byte {pos}")
        dims = list(struct.unpack(f"{self.order}{len(data) // 4}i", data[: len(data) // 4 * 4]))
        name, pos = self.int8_string(buf, pos)
        return mclass, is_complex, dims, name, pos

    def matrix(self, buf: bytes, pos: int) -> int:
        if pos + 8 > len(buf):
            raise self.fail(f"truncated at byte {pos}")
        mdtype, count = struct.unpack_from(self.order + "II", buf, pos)
        if mdtype != _MAT_MATRIX:
            raise self.fail(f"expected a matrix at byte {pos}")
        if count == 0:  # an empty matrix
            return pos + 8
        mclass, is_complex, dims, _, pos = self.header(buf, pos + 8)
        return self.array(buf, pos, mclass, is_complex, dims)

    def array(self, buf: bytes, pos: int, mclass: int, is_complex: bool, dims: list[int]) -> int:
        if mclass not in _MAT_CLASSES:
            raise self.fail(f"MATLAB class {mclass}, never in a devkit meta.mat")
        if mclass == 4 and not dims:  # scipy's chars_to_strings reads dims[-1] of a 0-d array: SIGSEGV too
            raise self.fail(f"a char array without dimensions before byte {pos}")
        if mclass == 4 or mclass >= 6:  # char, numeric: one data element (two: complex numeric)
            for _ in range(2 if is_complex and mclass != 4 else 1):
                mdtype, data, pos = self.element(buf, pos)
                if mdtype not in _MAT_DATA_TYPES and not (mclass == 4 and not data):  # scipy skips empty chars
                    raise self.fail(f"unknown data type {mdtype} before byte {pos}")
            return pos
        count = 1
        for d in dims:  # as scipy's size_t product
            count = count * (d % 2**64) % 2**64
        if mclass == 2:  # struct: field name length, the names, then each field of each element
            mdtype, data, pos = self.element(buf, pos)
            length = struct.unpack(self.order + "i", data)[0] if mdtype in (5, 6) and len(data) == 4 else 0
            if length <= 0:
                raise self.fail(f"bad struct field name length before byte {pos}")
            names, pos = self.int8_string(buf, pos)
            count *= len(names) // length
        if count > (len(buf) - pos) // 8:  # each element takes 8 bytes or more: scipy would run out too
            raise self.fail(f"{count} elements do not fit in the file")
        for _ in range(count):
            pos = self.matrix(buf, pos)
        return pos


def _check_mat5(data: bytes, source: str) -> None:
    """Refuse a meta.mat that would crash scipy's reader (see _MatWalk); scipy then reads the rest."""
    import scipy.io.matlab

    try:
        major = scipy.io.matlab.matfile_version(io.BytesIO(data))[0]
    except Exception as exc:  # too short, unknown version
        raise UserError(f"{source}: not a readable MATLAB file ({describe_error(exc, 160)})") from None
    if major != 1:  # v4 holds no structs; v7.3 is HDF5
        raise UserError(f"{source}: not a MATLAB 5 file (the devkit's meta.mat is one)")
    walk = _MatWalk(source, "<" if data[126:128] == b"IM" else ">")
    pos, inflated = 128, 0
    while pos < len(data):
        if pos + 8 > len(data):
            raise walk.fail(f"truncated at byte {pos}")
        mdtype, count = struct.unpack_from(walk.order + "II", data, pos)
        if count == 0:
            raise walk.fail(f"an empty variable at byte {pos}")
        buf, at = data, pos
        if mdtype == _MAT_COMPRESSED:
            try:
                buf = zlib.decompressobj().decompress(data[pos + 8 : pos + 8 + count], MAT_MAX_INFLATED - inflated + 1)
            except zlib.error as exc:
                raise walk.fail(f"compressed variable at byte {pos}: {exc}") from None
            inflated, at = inflated + len(buf), 0
            if inflated > MAT_MAX_INFLATED:
                raise UserError(f"{source}: not a devkit meta.mat (inflates past {MAT_MAX_INFLATED >> 20} MB)")
        if len(buf) < at + 8 or struct.unpack_from(walk.order + "I", buf, at)[0] != _MAT_MATRIX:
            raise walk.fail(f"expected a matrix at byte {pos}")
        mclass, is_complex, dims, name, after = walk.header(buf, at + 8)
        if name == b"synsets":  # the only variable read (loadmat's variable_names)
            walk.array(buf, after, mclass, is_complex, dims)
            return
        pos += 8 + count


def parse_devkit_meta(data: bytes, source: str = DEVKIT_META) -> dict[int, tuple[str, str]]:
    """ILSVRC2012_ID → (wnid, words) of the leaf classes (num_children == 0) in the devkit's meta.mat."""
    import numpy as np
    import scipy.io

    _check_mat5(data, source)
    try:
        mat = scipy.io.loadmat(io.BytesIO(data), squeeze_me=True, variable_names=["synsets"])
    except Exception as exc:  # scipy raises ValueError, TypeError, NotImplementedError (v7.3), ...
        raise UserError(f"{source}: not a readable MATLAB file ({describe_error(exc, 160)})") from None
    synsets = mat.get("synsets")
    names = getattr(getattr(synsets, "dtype", None), "names", None) or ()
    if not {"ILSVRC2012_ID", "WNID"} <= set(names):
        raise UserError(f"{source}: expected a struct array 'synsets' with fields ILSVRC2012_ID and WNID")
    leaves: dict[int, tuple[str, str]] = {}
    seen: dict[str, int] = {}
    for index, s in enumerate(np.atleast_1d(synsets), 1):
        if "num_children" in names and _mat_int(s["num_children"], source, index, "num_children") != 0:
            continue  # a non-leaf synset of the hierarchy (IDs > 1000)
        ilsvrc_id = _mat_int(s["ILSVRC2012_ID"], source, index, "ILSVRC2012_ID")
        wnid = _mat_text(s["WNID"], source, index, "WNID").strip()
        words = " ".join(_mat_text(s["words"], source, index, "words").split()) if "words" in names else ""
        if not WNID_RE.match(wnid):
            raise UserError(f"{source}: ILSVRC2012_ID {ilsvrc_id} has WNID {wnid!r}, not a wnid")
        if ilsvrc_id in leaves:
            raise UserError(f"{source}: ILSVRC2012_ID {ilsvrc_id} appears twice")
        if wnid in seen:
            raise UserError(f"{source}: {wnid} appears twice (IDs {seen[wnid]} and {ilsvrc_id})")
        leaves[ilsvrc_id], seen[wnid] = (wnid, words), ilsvrc_id
    if not leaves:
        raise UserError(f"{source}: no leaf synsets (num_children == 0)")
    return leaves


def parse_ground_truth(text: str, source: str = DEVKIT_GROUND_TRUTH) -> list[int]:
    """ILSVRC2012_ID of val image 1, 2, ... from the devkit's validation ground truth (one per line)."""
    lines = text.split("\n")  # not splitlines(): it also splits at \x0c, \x1c, \x85, ..., and shifts every label after
    while lines and not lines[-1].strip():
        lines.pop()
    ids = []
    for lineno, line in enumerate(lines, 1):
        value = line.strip()
        try:
            # Plain ASCII digits: int() also reads "+1", "1_000" and other scripts' digits ("١").
            if not (value.isascii() and value.isdigit()):
                raise ValueError(value)
            ids.append(int(value))  # ValueError past 4,300 digits too
        except ValueError:
            raise UserError(f"{source}:{lineno}: expected an ILSVRC2012_ID, found {line.strip()[:40]!r}") from None
    if not ids:
        raise UserError(f"{source}: empty")
    return ids


def _is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_SUFFIXES)


def _is_listed(path: str) -> bool:
    """Whether a file found among images is an image to list (anything but obvious metadata)."""
    if _is_image(path):
        return True
    base = posixpath.basename(path)
    return not (base.startswith(".") or base.lower().endswith(METADATA_SUFFIXES))


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


class _Item(NamedTuple):
    """An unlabeled image: where it is and which class it belongs to."""

    key: str
    wnid: str
    size: int
    path: str = ""
    offset: int = -1


def _label(items: Iterable[_Item], classes: ClassList, mapping: str, where: str = "") -> tuple[ImageRecord, ...]:
    """Records sorted by key; a class missing from `mapping` is a UserError naming it."""
    index = classes.index
    records = []
    for it in items:
        label = index.get(it.wnid)
        if label is None:
            raise UserError(f"{where or it.key}: class {it.wnid} is not in {mapping}")
        records.append(ImageRecord(it.key, it.wnid, label, it.size, it.path, it.offset))
    records.sort(key=lambda r: r.key)
    return tuple(records)


class _Source:
    """The dataset root: its top level, plus memoised listings of the folders a layout asks for."""

    def __init__(self, root: storage.Location, pool: ThreadPoolExecutor):
        self.root, self.pool = root, pool
        self._base = root.path.rstrip("/") + "/"
        self._listed: dict[tuple[str, bool], tuple[dict[str, int], set[str]]] = {}
        self.top_files, self.top_dirs = self.list_dir("")

    def url(self, rel: str = "") -> str:
        return self.root.child(rel).url if rel else self.root.url

    def _rel(self, path: str) -> str:
        return path[len(self._base) :] if path.startswith(self._base) else path

    def list_dir(self, rel: str, recursive: bool = False) -> tuple[dict[str, int], set[str]]:
        """(files below `rel`: root-relative path → size, names of the folders directly in `rel`)."""
        memo = self._listed.get((rel, recursive))
        if memo is not None:
            return memo
        path = self.root.child(rel).path if rel else self.root.path
        try:
            infos = self.root.fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True))
        except NotADirectoryError:
            infos = []
        except OSError as exc:
            raise UserError(storage.describe_os_error(self.url(rel), exc)) from None
        files: dict[str, int] = {}
        dirs: set[str] = set()
        prefix = rel + "/" if rel else ""
        for info in infos:
            rel_path = self._rel(info.path)
            if info.type == pafs.FileType.File:
                files[rel_path] = info.size
            elif info.type == pafs.FileType.Directory and "/" not in rel_path[len(prefix) :]:
                dirs.add(rel_path[len(prefix) :])
        self._listed[(rel, recursive)] = (files, dirs)
        return files, dirs

    def list_class_folders(self, rel: str) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
        """(files directly in `rel`, folder name → its files): one listing per folder, concurrently."""
        files, dirs = self.list_dir(rel)
        names = sorted(d for d in dirs if not _is_hidden(d))
        listed = self.pool.map(lambda d: self.list_dir(f"{rel}/{d}" if rel else d, recursive=True)[0], names)
        return files, dict(zip(names, listed, strict=True))

    def read(self, rel: str) -> bytes:
        return storage.read_bytes(self.root.child(rel))

    def has_file(self, rel: str) -> bool:
        if "/" not in rel:
            return rel in self.top_files
        return rel in self.list_dir(rel.split("/", 1)[0], recursive=True)[0]


# --- tar indexing ------------------------------------------------------------------------------------------------


class _TarView:
    """Read-only, seekable view of bytes [start, start + length) of a pyarrow random-access file.

    Reads shorter than TAR_READAHEAD fetch TAR_READAHEAD bytes and serve the next reads from them, so
    tarfile's header walk (seek to offset-1, read 1 byte, read the 512-byte header, maybe long-name
    blocks) costs one ranged read per member.
    """

    def __init__(self, f: pa.NativeFile, start: int, length: int) -> None:
        self._f, self._start, self._len = f, start, length
        self._pos = 0
        self._buf, self._buf_at = b"", 0

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = max(0, pos + (0, self._pos, self._len)[whence])
        return self._pos

    def read(self, n: int | None = -1) -> bytes:
        end = self._len if n is None or n < 0 else min(self._len, self._pos + n)
        if end <= self._pos:
            return b""
        lo, hi = self._pos - self._buf_at, end - self._buf_at
        if lo >= 0 and hi <= len(self._buf):
            data = self._buf[lo:hi]
        elif end - self._pos >= TAR_READAHEAD:
            data = self._f.read_at(end - self._pos, self._start + self._pos)
        else:
            self._buf = self._f.read_at(min(TAR_READAHEAD, self._len - self._pos), self._start + self._pos)
            self._buf_at = self._pos
            data = self._buf[: end - self._pos]
        self._pos += len(data)
        return data


def _member_name(name: str) -> str:
    name = posixpath.normpath(name.lstrip("/"))
    return "" if name == "." else name


def _tar_members(f: pa.NativeFile, start: int, length: int, where: str) -> list[tuple[str, int, int]]:
    """(member name, absolute data offset, size) of each regular file in the tar at [start, start+length)."""
    members = []
    try:
        with tarfile.open(fileobj=_TarView(f, start, length), mode="r:") as tf:  # type: ignore[call-overload]
            for m in tf:
                # A GNU base-256 size can be negative: tarfile then steps back to an earlier header (or
                # rereads this one forever, at -512).
                if m.size < 0:
                    raise UserError(f"{where}: member {m.name!r} has a negative size; not a readable tar")
                if not m.isfile():
                    continue
                if m.issparse():
                    raise UserError(f"{where}: member {m.name!r} is a sparse file; cannot read it as a byte range")
                try:
                    m.name.encode()
                except UnicodeEncodeError:  # undecodable bytes, kept by tarfile as surrogates: no key can hold them
                    raise UserError(f"{where}: member {m.name!r} is not named in UTF-8") from None
                members.append((_member_name(m.name), start + m.offset_data, m.size))
    except tarfile.TarError as exc:
        raise UserError(f"{where}: not a readable tar ({exc})") from None
    except OSError as exc:
        raise UserError(storage.describe_os_error(where, exc)) from None
    return members


def _open(src: _Source, rel: str) -> pa.NativeFile:
    loc = src.root.child(rel)
    try:
        return loc.fs.open_input_file(loc.path)
    except OSError as exc:
        raise UserError(storage.describe_os_error(loc.url, exc)) from None


def _index_class_tar(src: _Source, rel: str, start: int, length: int, wnid: str, name: str) -> list[_Item]:
    """Images of one per-class tar (`name` inside object `rel`, or `rel` itself when name is empty)."""
    with _open(src, rel) as f:  # one handle per task: tasks run in parallel
        if length < 0:
            length = f.size()
        prefix = f"{rel}/{name}" if name else rel
        members = _tar_members(f, start, length, f"{src.url(rel)}{'/' + name if name else ''}")
    return [_Item(f"{prefix}/{m}", wnid, size, rel, offset) for m, offset, size in members if _is_listed(m)]


def _index_train_tar(src: _Source) -> dict[str, list[_Item]]:
    """wnid → images of ILSVRC2012_img_train.tar: its inner <wnid>.tar members, indexed in parallel."""
    with _open(src, TRAIN_TAR) as f:
        outer = _tar_members(f, 0, f.size(), src.url(TRAIN_TAR))
    inner: dict[str, tuple[str, int, int]] = {}
    for name, offset, size in outer:
        base = posixpath.basename(name)
        wnid = base[:-4] if base.endswith(".tar") else ""
        if WNID_RE.match(wnid):
            if wnid in inner:
                raise UserError(f"{src.url(TRAIN_TAR)}: two tars for class {wnid} ({inner[wnid][0]}, {name})")
            inner[wnid] = (name, offset, size)
        elif _is_listed(name):
            raise UserError(f"{src.url(TRAIN_TAR)}: unexpected member {name} (expected one <wnid>.tar per class)")
    if not inner:
        raise UserError(f"{src.url(TRAIN_TAR)}: no per-class <wnid>.tar members inside")
    wnids = sorted(inner)
    jobs = src.pool.map(lambda w: _index_class_tar(src, TRAIN_TAR, inner[w][1], inner[w][2], w, inner[w][0]), wnids)
    return dict(zip(wnids, jobs, strict=True))


# --- the train split (shared by folders, devkit, tars) ----------------------------------------------------------


def _find_train(src: _Source, layout: str) -> dict[str, list[_Item]]:
    """wnid → train images, from train/<wnid>/ folders, train/<wnid>.tar, or ILSVRC2012_img_train.tar."""
    if TRAIN_DIR in src.top_dirs:
        loose, folders = src.list_class_folders(TRAIN_DIR)
        by_class: dict[str, list[_Item]] = {}
        for name, files in folders.items():
            if not WNID_RE.match(name):
                raise UserError(
                    f"{src.url(TRAIN_DIR + '/' + name)}: not a class folder "
                    f"(expected train/<wnid>/ with a wnid like n01440764)"
                )
            items = by_class.setdefault(name, [])
            for rel, size in files.items():
                if _is_listed(rel):
                    if rel.count("/") != 2:
                        raise UserError(f"{src.root.url}: unexpected train path {rel} (expected train/<wnid>/<file>)")
                    items.append(_Item(rel, name, size))
        tars = {}
        for rel, size in loose.items():
            base = posixpath.basename(rel)
            if base.endswith(".tar") and WNID_RE.match(base[:-4]):
                tars[base[:-4]] = (rel, size)
            elif _is_listed(rel):
                raise UserError(
                    f"{src.url(rel)}: a file outside a class folder (expected train/<wnid>/<file> or train/<wnid>.tar)"
                )
        both = sorted(set(tars) & set(by_class))
        if both:
            raise UserError(
                f"{src.url(TRAIN_DIR)}: both train/{both[0]}/ and train/{both[0]}.tar exist; "
                f"finish (or undo) extracting the per-class tars"
            )
        indexed = src.pool.map(lambda w: _index_class_tar(src, tars[w][0], 0, tars[w][1], w, ""), sorted(tars))
        by_class.update(zip(sorted(tars), indexed, strict=True))
        if by_class:
            return by_class
    if TRAIN_TAR in src.top_files:
        return _index_train_tar(src)
    raise _not_layout(src, layout, f"no train/<wnid>/ folders, train/<wnid>.tar or {TRAIN_TAR}")


def _flat(by_class: dict[str, list[_Item]]) -> list[_Item]:
    return [it for items in by_class.values() for it in items]


# --- the devkit -------------------------------------------------------------------------------------------------


class _Devkit(NamedTuple):
    classes: ClassList
    id_to_wnid: dict[int, str]
    ground_truth: list[int]
    meta_source: str
    gt_source: str


def _devkit_file(src: _Source, name: str, targz: list[dict[str, bytes]]) -> tuple[bytes, str] | None:
    """(bytes, where) of a devkit file: at the root, under ILSVRC2012_devkit_t12/data/, or in its .tar.gz."""
    if name in src.top_files:
        return src.read(name), src.url(name)
    extracted = f"{DEVKIT_DIR}/data/{name}"
    if DEVKIT_DIR in src.top_dirs and src.has_file(extracted):
        return src.read(extracted), src.url(extracted)
    if DEVKIT_TARGZ in src.top_files:
        if not targz:
            targz.append(_read_targz(src))
        members = targz[0]
        found = sorted(m for m in members if posixpath.basename(m) == name)
        if found:
            return members[found[0]], f"{src.url(DEVKIT_TARGZ)}:{found[0]}"
    return None


def _read_targz(src: _Source) -> dict[str, bytes]:
    """The small files of the devkit tarball (read in memory; it is about 2.5 MB)."""
    wanted = {DEVKIT_META, DEVKIT_GROUND_TRUTH}
    out = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(src.read(DEVKIT_TARGZ)), mode="r:*") as tf:
            for m in tf:
                if m.isfile() and posixpath.basename(m.name) in wanted:
                    member = tf.extractfile(m)
                    if member is not None:
                        out[_member_name(m.name)] = member.read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise UserError(f"{src.url(DEVKIT_TARGZ)}: not a readable .tar.gz ({exc})") from None
    return out


def _load_devkit(src: _Source, layout: str) -> _Devkit:
    targz: list[dict[str, bytes]] = []
    meta = _devkit_file(src, DEVKIT_META, targz)
    gt = _devkit_file(src, DEVKIT_GROUND_TRUTH, targz)
    missing = [n for n, v in ((DEVKIT_META, meta), (DEVKIT_GROUND_TRUTH, gt)) if v is None]
    if meta is None or gt is None:
        raise _not_layout(
            src, layout, f"no {' or '.join(missing)} (looked at the root, in {DEVKIT_DIR}/data/ and in {DEVKIT_TARGZ})"
        )
    leaves = parse_devkit_meta(meta[0], meta[1])
    ordered = sorted(leaves.values())
    classes = ClassList(tuple(w for w, _ in ordered), tuple(n for _, n in ordered))
    try:
        text = gt[0].decode()
    except UnicodeDecodeError:
        raise UserError(f"{gt[1]}: not a text file") from None
    ids = parse_ground_truth(text, gt[1])
    for lineno, i in enumerate(ids, 1):
        if i not in leaves:
            raise UserError(f"{gt[1]}:{lineno}: ILSVRC2012_ID {i} is not a leaf class in {meta[1]}")
    return _Devkit(classes, {i: w for i, (w, _) in leaves.items()}, ids, meta[1], gt[1])


def _label_devkit_val(src: _Source, numbered: dict[int, _Item], kit: _Devkit) -> list[_Item]:
    """Give each val image the wnid of its ground-truth line; both sides must match one to one."""
    n = len(kit.ground_truth)
    beyond = sorted(i for i in numbered if not 1 <= i <= n)
    if beyond:
        raise UserError(
            f"{kit.gt_source}: no ground-truth line for val image {numbered[beyond[0]].key} "
            f"(the file has {n} lines; {len(beyond)} images unlabeled)"
        )
    if len(numbered) < n:
        absent = next(i for i in range(1, n + 1) if i not in numbered)
        raise UserError(
            f"{kit.gt_source} has {n} lines but {src.root.url} holds {len(numbered)} val images: "
            f"ILSVRC2012_val_{absent:08d} is missing ({n - len(numbered)} missing)"
        )
    return [it._replace(wnid=kit.id_to_wnid[kit.ground_truth[i - 1]]) for i, it in numbered.items()]


def _number_val(items: Iterable[_Item], where: str) -> dict[int, _Item]:
    """Val image number (from ILSVRC2012_val_<8 digits>.<ext>) → image."""
    numbered: dict[int, _Item] = {}
    for it in items:
        match = VAL_NAME_RE.match(posixpath.basename(it.key))
        if not match:
            raise UserError(
                f"{where}: {it.key} is not named ILSVRC2012_val_<8 digits>.JPEG (its ground-truth line cannot be found)"
            )
        number = int(match.group(1))
        if number in numbered:
            raise UserError(f"{where}: val image {number} appears twice ({numbered[number].key}, {it.key})")
        numbered[number] = it
    return numbered


# --- layouts ----------------------------------------------------------------------------------------------------


def _not_layout(src: _Source, layout: str, problem: str) -> UserError:
    return UserError(f"{src.root.url}: not the {layout} layout ({problem}); {layout} expects {LAYOUT_HELP[layout]}")


def list_kaggle(root: storage.Location, files: dict[str, int]) -> LayoutListing:
    """Kaggle CLS-LOC listing from `files` (relative path → size)."""
    classes = parse_synset_mapping(storage.read_bytes(root.child(KAGGLE_SYNSETS)).decode(), KAGGLE_SYNSETS)
    train: list[_Item] = []
    val_files: dict[str, tuple[str, int]] = {}
    train_prefix, val_prefix = KAGGLE_TRAIN_DIR + "/", KAGGLE_VAL_DIR + "/"
    for rel, size in files.items():
        if not _is_listed(rel):
            continue
        if rel.startswith(train_prefix):
            parts = rel[len(train_prefix) :].split("/")
            if len(parts) != 2:
                raise UserError(f"{root.url}: unexpected train path {rel} (expected train/<wnid>/<file>)")
            train.append(_Item(rel, parts[0], size))
        elif rel.startswith(val_prefix):
            image_id = posixpath.splitext(posixpath.basename(rel))[0]
            val_files[image_id] = (rel, size)
    solution = parse_val_solution(storage.read_bytes(root.child(KAGGLE_VAL_SOLUTION)).decode())
    missing = sorted(set(val_files) - set(solution))
    if missing:
        raise UserError(f"{KAGGLE_VAL_SOLUTION}: no label for val image {missing[0]} ({len(missing)} unlabeled)")
    absent = sorted(set(solution) - set(val_files))
    if absent:
        raise UserError(
            f"{root.url}: val image {absent[0]} is in {KAGGLE_VAL_SOLUTION} but not on storage ({len(absent)} missing)"
        )
    val = [_Item(rel, solution[i], size) for i, (rel, size) in val_files.items()]
    return LayoutListing(
        "kaggle",
        root.url,
        classes,
        _label(train, classes, KAGGLE_SYNSETS),
        _label(val, classes, KAGGLE_SYNSETS, f"{KAGGLE_VAL_SOLUTION} (val)"),
    )


def _list_kaggle(src: _Source) -> LayoutListing:
    for name in (KAGGLE_SYNSETS, KAGGLE_VAL_SOLUTION):
        if name not in src.top_files:
            raise _not_layout(src, "kaggle", f"no {name}")
    loose, folders = src.list_class_folders(KAGGLE_TRAIN_DIR)
    if not folders:
        raise _not_layout(src, "kaggle", f"no {KAGGLE_TRAIN_DIR}/<wnid>/ folders")
    files = dict(src.top_files)
    files.update(loose)
    for folder_files in folders.values():
        files.update(folder_files)
    files.update(src.list_dir(KAGGLE_VAL_DIR, recursive=True)[0])
    return list_kaggle(src.root, files)


def _val_folders(src: _Source) -> tuple[dict[str, int], set[str]]:
    if VAL_DIR not in src.top_dirs:
        return {}, set()
    return src.list_dir(VAL_DIR)


def _list_folders(src: _Source) -> LayoutListing:
    val_loose, val_dirs = _val_folders(src)
    if not any(WNID_RE.match(d) for d in val_dirs):
        raise _not_layout(src, "folders", "no val/<wnid>/ folders")
    train = _find_train(src, "folders")
    if KAGGLE_SYNSETS in src.top_files:
        classes = parse_synset_mapping(src.read(KAGGLE_SYNSETS).decode(), src.url(KAGGLE_SYNSETS))
        mapping = src.url(KAGGLE_SYNSETS)
    else:
        known = imagenet_classes()
        wnids = sorted(train)
        classes = ClassList(tuple(wnids), tuple(known.names[known.index[w]] if w in known.index else "" for w in wnids))
        mapping = "the classes of the train folders"
    _, folders = src.list_class_folders(VAL_DIR)
    val: list[_Item] = []
    for name, files in folders.items():
        if not WNID_RE.match(name):
            raise UserError(f"{src.url(VAL_DIR + '/' + name)}: not a class folder (expected val/<wnid>/)")
        if name not in classes.index:
            raise UserError(f"{src.url(VAL_DIR + '/' + name)}: val class {name} is not in {mapping}")
        for rel, size in files.items():
            if _is_listed(rel):
                if rel.count("/") != 2:
                    raise UserError(f"{src.root.url}: unexpected val path {rel} (expected val/<wnid>/<file>)")
                val.append(_Item(rel, name, size))
    for rel in val_loose:
        if _is_listed(rel):
            raise UserError(f"{src.url(rel)}: a file outside a class folder (expected val/<wnid>/<file>)")
    return LayoutListing(
        "folders", src.root.url, classes, _label(_flat(train), classes, mapping), _label(val, classes, mapping)
    )


def _flat_val_location(src: _Source) -> str | None:
    """Where flat ILSVRC2012_val_* images are: "val", "" (the root) or None."""
    val_loose, _ = _val_folders(src)
    in_val = any(VAL_NAME_RE.match(posixpath.basename(r)) for r in val_loose)
    at_root = any(VAL_NAME_RE.match(r) for r in src.top_files)
    if in_val and at_root:
        raise UserError(f"{src.root.url}: flat val images both in val/ and at the root; keep one set")
    return VAL_DIR if in_val else "" if at_root else None


def _list_devkit(src: _Source) -> LayoutListing:
    where = _flat_val_location(src)
    if where is None:
        raise _not_layout(src, "devkit", "no ILSVRC2012_val_<8 digits>.JPEG files in val/ or at the root")
    kit = _load_devkit(src, "devkit")
    if where:
        files = _val_folders(src)[0]
        items = [_Item(rel, "", size) for rel, size in files.items() if _is_listed(rel)]
    else:
        items = [_Item(rel, "", size) for rel, size in src.top_files.items() if VAL_NAME_RE.match(rel)]
    val = _label_devkit_val(src, _number_val(items, src.url(where)), kit)
    train = _find_train(src, "devkit")
    return LayoutListing(
        "devkit",
        src.root.url,
        kit.classes,
        _label(_flat(train), kit.classes, kit.meta_source),
        _label(val, kit.classes, kit.meta_source),
    )


def _list_tars(src: _Source) -> LayoutListing:
    if VAL_TAR not in src.top_files:
        raise _not_layout(src, "tars", f"no {VAL_TAR}")
    kit = _load_devkit(src, "tars")
    with _open(src, VAL_TAR) as f:
        members = _tar_members(f, 0, f.size(), src.url(VAL_TAR))
    items = [_Item(f"{VAL_TAR}/{m}", "", size, VAL_TAR, offset) for m, offset, size in members if _is_listed(m)]
    val = _label_devkit_val(src, _number_val(items, src.url(VAL_TAR)), kit)
    train = _find_train(src, "tars")
    return LayoutListing(
        "tars",
        src.root.url,
        kit.classes,
        _label(_flat(train), kit.classes, kit.meta_source),
        _label(val, kit.classes, kit.meta_source),
    )


_LISTERS: dict[str, Callable[[_Source], LayoutListing]] = {
    "kaggle": _list_kaggle,
    "folders": _list_folders,
    "devkit": _list_devkit,
    "tars": _list_tars,
}


def _detect(src: _Source) -> str | None:
    """The layout the top level (and val/) looks like; the lister then checks the rest."""
    if KAGGLE_SYNSETS in src.top_files and "ILSVRC" in src.top_dirs:
        return "kaggle"
    _, val_dirs = _val_folders(src)
    if any(WNID_RE.match(d) for d in val_dirs):
        return "folders"
    if _flat_val_location(src) is not None:
        return "devkit"
    if VAL_TAR in src.top_files:
        return "tars"
    return None


def _no_layout(src: _Source) -> UserError:
    files, _ = src.list_dir("", recursive=True)
    names = sorted([d + "/" for d in src.top_dirs] + list(src.top_files))
    top = ", ".join(names[:10]) + (f", ... ({len(names)} entries)" if len(names) > 10 else "")
    expected = "; ".join(f"{name} = {help_}" for name, help_ in LAYOUT_HELP.items())
    return UserError(
        f"{src.root.url}: no known ILSVRC layout (found {len(files)} files; top level: {top}); "
        f"expected one of: {expected}"
    )


def detect_and_list(root_url: str, layout: str | None = None) -> LayoutListing:
    """List a dataset root, detect its layout (or use `layout`), return every image with its label."""
    if layout is not None and layout not in LAYOUTS:
        raise UserError(f"unknown layout {layout!r} (known: {', '.join(LAYOUTS)})")
    root = storage.resolve(root_url)
    try:
        info = root.fs.get_file_info(root.path)
    except OSError as exc:
        raise UserError(storage.describe_os_error(root.url, exc)) from None
    if info.type == pafs.FileType.File:
        raise UserError(f"{root_url} is a file; pass the folder (or prefix) that holds the dataset")
    with ThreadPoolExecutor(LIST_WORKERS, thread_name_prefix="layout-list") as pool:
        src = _Source(root, pool)
        if not src.top_files and not src.top_dirs:
            raise UserError(f"{root_url}: nothing found there (missing or empty prefix)")
        name = layout or _detect(src)
        if name is None:
            raise _no_layout(src)
        return _LISTERS[name](src)
