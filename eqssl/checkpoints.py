"""Checkpoints a run resumes from: a clear error naming an unreadable one, and checkpoint_last
repaired from the checkpoint it is a copy of.

fairseq writes each checkpoint atomically (to ``.tmp``, then renamed) but then *copies* it to
``checkpoint_last.pt`` / ``checkpoint_best.pt`` in place: a run killed during that copy leaves a
truncated ``checkpoint_last.pt`` beside an intact source. Unpickling a truncated file fails deep
in torch, and a flipped byte inside a tensor is not noticed by ``torch.load`` at all; the
zip archive's CRC-32 of every record is.
"""

import glob
import hashlib
import logging
import os
import shutil
import zipfile
from typing import Optional

logger = logging.getLogger(__name__)

ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since PyTorch 1.6
PICKLE_MAGIC = b"\x80"  # the legacy format: nothing cheap to check


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file."""


def file_sha256(path: str) -> str:
    """SHA-256 of a file, read in 1 MiB blocks: what the experiment's stage records and the
    probe's feature cache key a checkpoint by."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_checkpoint(path: str) -> None:
    """Raise CheckpointError naming ``path`` unless it is a complete torch checkpoint
    (reads the file once to verify every record's CRC; loads nothing)."""
    with open(path, "rb") as f:
        head = f.read(4)
    size = os.path.getsize(path)
    if head[:1] == PICKLE_MAGIC:
        return
    if head != ZIP_MAGIC:
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({size} bytes, starts with {head!r})")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({size} bytes): {error}") from None
    if bad is not None:
        raise CheckpointError(f"{path}: corrupt checkpoint: record {bad} fails its CRC-32 check")


def load_failure(path: str, error: Exception) -> str:
    """Why ``path`` could not be loaded, in one line: the file check's own finding if it fails,
    else the first sentence of the loader's error (torch's run to a page of advice)."""
    try:
        check_checkpoint(path)
    except CheckpointError as found:
        return str(found).removeprefix(f"{path}: ")
    except OSError as found:
        return found.strerror or str(found)
    first = (str(error).strip().splitlines() or [""])[0].split(". ")[0].rstrip(".")
    return f"not a readable checkpoint: {type(error).__name__}: {first}"


def readable(path: str) -> bool:
    try:
        check_checkpoint(path)
    except (CheckpointError, OSError):
        return False
    return True


def repair_last_checkpoint(save_dir: str, suffix: str = "") -> Optional[str]:
    """If ``save_dir/checkpoint_last{suffix}.pt`` is unreadable, move it aside to
    ``….corrupt`` and replace it, atomically, with a copy of the newest readable checkpoint in
    ``save_dir``. Returns that checkpoint's path; None when there was nothing to repair."""
    last = os.path.join(save_dir, f"checkpoint_last{suffix}.pt")
    if not os.path.exists(last):
        return None
    try:
        check_checkpoint(last)
        return None
    except CheckpointError as error:
        problem = str(error)
    candidates = [p for p in glob.glob(os.path.join(save_dir, f"checkpoint*{suffix}.pt")) if p != last]
    candidates.sort(key=os.path.getmtime, reverse=True)
    source = next((p for p in candidates if readable(p)), None)
    if source is None:
        raise CheckpointError(f"{problem}; no readable checkpoint*.pt in {save_dir} to resume from instead")
    aside = last + ".corrupt"
    n = 1
    while os.path.exists(aside):  # never overwrite an earlier one
        aside, n = f"{last}.corrupt.{n}", n + 1
    os.replace(last, aside)
    shutil.copyfile(source, last + ".tmp")
    os.replace(last + ".tmp", last)
    logger.warning("%s; moved to %s and replaced by a copy of %s, the newest readable checkpoint "
                   "(the run was probably killed while fairseq copied it)", problem, aside, source)
    return source
