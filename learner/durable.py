"""State files that must survive a crash whole: written beside, fsynced, renamed over, directory synced."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable


def fsync_dir(directory: Path) -> None:
    """A created or renamed file survives power loss only once its directory entry is synced."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_atomically(path: Path, chunks: Iterable[bytes]) -> None:
    """Replace `path` with `chunks`: after a crash it holds the old content or the new, never a torn mix."""
    temp = path.with_name(path.name + ".tmp")
    with temp.open("wb") as f:
        f.writelines(chunks)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)
    fsync_dir(path.parent)


def write_json(path: Path, value) -> None:
    """`replace_atomically` with `value` as JSON."""
    replace_atomically(path, [json.dumps(value, indent=1).encode()])
