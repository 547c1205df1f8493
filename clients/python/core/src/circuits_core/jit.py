"""Where numba keeps its compiled kernels (call :func:`prepare_numba` before importing numba).

numba caches compiled functions beside their source, or in a user cache folder; a service running
from a read-only image as a user without a home has neither, and numba then refuses the cache at
import. :func:`prepare_numba` points ``NUMBA_CACHE_DIR`` at the first writable folder of
``$XDG_CACHE_HOME/circuits/numba``, ``~/.cache/circuits/numba`` and a per-user temp folder, unless
the environment already chose one; with none writable, kernels compile in memory (each process
pays the compile, a few seconds, once).
"""

from __future__ import annotations

import os
import tempfile


def prepare_numba() -> str | None:
    """Set (once) and return the numba cache folder; None when no folder is writable (compile
    without a disk cache then)."""
    chosen = os.environ.get("NUMBA_CACHE_DIR")
    if chosen:
        return chosen
    home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    uid = os.getuid() if hasattr(os, "getuid") else 0
    for folder in (os.path.join(home, "circuits", "numba"), os.path.join(tempfile.gettempdir(), f"circuits-numba-{uid}")):
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError:
            continue
        if os.access(folder, os.W_OK):
            break
    else:
        return None
    os.environ["NUMBA_CACHE_DIR"] = folder
    return folder
