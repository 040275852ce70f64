"""An audit of exactly-once delivery: with IMAGENET_RAY_AUDIT_SAMPLES_DIR set for the driver, each rank
appends `epoch batch digest` per training sample (SHA-1 of its JPEG bytes; decode_on=gpu) to a file of
its own, so a test or an operator can check that a resumed epoch trained on every sample once."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

AUDIT_ENV = "IMAGENET_RAY_AUDIT_SAMPLES_DIR"


def audit_dir_from_env() -> str:
    return os.environ.get(AUDIT_ENV, "")


class SampleAudit:
    """One rank's audit file in `directory` (one file per process: a restarted worker writes another)."""

    def __init__(self, directory: str, rank: int) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.path = Path(directory) / f"rank{rank}-pid{os.getpid()}.tsv"

    def record(self, epoch: int, batch: int, images: Sequence[bytes]) -> None:
        lines = "".join(f"{epoch}\t{batch}\t{hashlib.sha1(bytes(b)).hexdigest()[:20]}\n" for b in images)
        with self.path.open("a") as f:
            f.write(lines)


def read_audit(directory: str | os.PathLike[str]) -> list[tuple[str, int, int, str]]:
    """(file name, epoch, batch, digest) for every line of every rank's file."""
    rows = []
    for path in sorted(Path(directory).glob("rank*.tsv")):
        for line in path.read_text().splitlines():
            epoch, batch, digest = line.split("\t")
            rows.append((path.name, int(epoch), int(batch), digest))
    return rows
