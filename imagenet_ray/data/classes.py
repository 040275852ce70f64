"""The ILSVRC2012 classes: wnids in sorted order (index 0 = n01440764 tench) and their names.

Labels everywhere in this project are indices into a *sorted* list of wnids, never into a list of
names: two classes share the name "crane" (n02012849 the bird, n03126707 the machine) and two share
"maillot". The package carries its own copy of Kaggle's LOC_synset_mapping.txt.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from importlib import resources

from imagenet_ray.errors import UserError

# [0-9], not \d (any script's digits: n٠١٤٤٠٧٦٤); \Z, not $ (which also matches before a final newline).
WNID_RE = re.compile(r"^n[0-9]{8}\Z")
NUM_IMAGENET_CLASSES = 1000


@dataclass(frozen=True)
class ClassList:
    """An ordered set of classes; label i is wnids[i]. wnids are sorted and unique."""

    wnids: tuple[str, ...]
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        if list(self.wnids) != sorted(set(self.wnids)):
            raise UserError("class list: wnids must be unique and in sorted order")
        if len(self.names) != len(self.wnids):
            raise UserError("class list: one name per wnid required")

    def __len__(self) -> int:
        return len(self.wnids)

    @functools.cached_property
    def index(self) -> dict[str, int]:
        return {w: i for i, w in enumerate(self.wnids)}

    def label_of(self, wnid: str) -> int:
        try:
            return self.index[wnid]
        except KeyError:
            raise UserError(f"class {wnid} is not in the synset mapping") from None

    def subset(self, wnids: list[str] | tuple[str, ...]) -> ClassList:
        ordered = sorted(set(wnids))
        return ClassList(tuple(ordered), tuple(self.names[self.label_of(w)] for w in ordered))

    def to_synset_mapping(self) -> str:
        """Kaggle's LOC_synset_mapping.txt format: `wnid names` per line, sorted by wnid."""
        return "".join(f"{w} {n}\n" for w, n in zip(self.wnids, self.names, strict=True))


def parse_synset_mapping(text: str, source: str = "LOC_synset_mapping.txt") -> ClassList:
    """Parse `wnid name, other name` lines; the result is sorted by wnid whatever the file order."""
    pairs: dict[str, str] = {}
    # Lines end at \n (and \r\n) only: splitlines() also splits at \x1c, \x85, \u2028, ... inside a name.
    for lineno, raw in enumerate(text.split("\n"), 1):
        line = raw.strip()
        if not line:
            continue
        wnid, _, names = line.partition(" ")
        if not WNID_RE.match(wnid):
            raise UserError(f"{source}:{lineno}: {wnid!r} is not a wnid (expected n + 8 digits)")
        if wnid in pairs:
            raise UserError(f"{source}:{lineno}: wnid {wnid} appears twice")
        pairs[wnid] = names.strip()
    if not pairs:
        raise UserError(f"{source}: no classes found")
    ordered = sorted(pairs)
    return ClassList(tuple(ordered), tuple(pairs[w] for w in ordered))


@functools.cache
def imagenet_classes() -> ClassList:
    """The 1,000 ILSVRC2012 classes in sorted-wnid order."""
    text = resources.files("imagenet_ray.data").joinpath("LOC_synset_mapping.txt").read_text()
    classes = parse_synset_mapping(text)
    assert len(classes) == NUM_IMAGENET_CLASSES
    return classes
