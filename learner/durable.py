"""Small state files that must survive a crash whole: written beside, fsynced, renamed over."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_json(path: Path, value) -> None:
    """Replace `path` with `value` as JSON: after a crash it holds the old content or the new, never a torn mix."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        json.dump(value, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself is durable
    finally:
        os.close(directory)
