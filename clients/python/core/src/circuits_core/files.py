"""Atomic file writes shared by the format owners (graphio, labels): a reader never sees a half file.

The content goes to a hidden temporary file beside the target, is flushed and fsynced, and then
renamed over the target; on any error the temporary file is removed and the target is untouched.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_writer(path: str | Path, *, text: bool = False) -> Iterator[IO[Any]]:
    """``with atomic_writer(path) as fh: fh.write(...)``; the file appears at ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w" if text else "wb", **({"encoding": "utf-8"} if text else {})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
