"""Model files a service user in a container can read: modes of prepared checkpoints, the error an
unreadable one gives, and `--device auto`.

The unreadable-file error as another uid sees it (root reads everything) is checked in the
attribution image by `scripts/images.sh smoke` (step attribution-unreadable-model).
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from circuits_core.errors import PermissionDenied
from circuits_attribution.models import check_readable, load_model, make_readable


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_make_readable_gives_the_read_bits_the_umask_allows(tmp_path) -> None:
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"w")
    weights.chmod(0o600)  # how safetensors writes it
    config = tmp_path / "config.json"
    config.write_text("{}")
    config.chmod(0o644)
    old = os.umask(0o022)
    try:
        make_readable(tmp_path)
    finally:
        os.umask(old)
    assert mode(weights) == 0o644
    assert mode(config) == 0o644


def test_make_readable_respects_a_private_umask(tmp_path) -> None:
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"w")
    weights.chmod(0o600)
    old = os.umask(0o077)
    try:
        make_readable(tmp_path)
    finally:
        os.umask(old)
    assert mode(weights) == 0o600  # the owner asked for private files


def test_prepared_files_are_world_readable_in_a_fresh_process(tmp_path) -> None:
    """make_readable reads the umask from /proc without changing it (thread-safe); check it in a
    child with a known umask, as `python -m circuits_attribution.prepare_model` would run."""
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"w")
    weights.chmod(0o600)
    code = "import os, sys; from pathlib import Path; os.umask(0o022); " \
           "from circuits_attribution.models import make_readable; make_readable(Path(sys.argv[1]))"
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=120)
    assert mode(weights) == 0o644


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read every file; the image smoke test covers uid 10001")
def test_an_unreadable_weight_file_is_named_with_permission_denied(tmp_path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"w")
    weights.chmod(0o000)
    with pytest.raises(PermissionDenied, match=r"cannot read .*model\.safetensors: permission denied"):
        load_model(str(tmp_path))


def test_check_readable_passes_a_readable_checkpoint(tiny_checkpoint) -> None:
    check_readable(tiny_checkpoint)  # no error: every file readable


def test_device_auto_picks_cpu_without_a_gpu() -> None:
    import torch

    from circuits_attribution.__main__ import build_parser
    from circuits_attribution.models import resolve_device

    assert resolve_device("cpu") == "cpu" and resolve_device("cuda:1") == "cuda:1"
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto") == expected
    assert build_parser().parse_args(["--device", "auto"]).device == "auto"
