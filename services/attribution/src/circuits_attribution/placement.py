"""Where a model's layers live: device maps for models larger than one device.

A model loaded with a device map (transformers ``device_map=...`` / accelerate ``dispatch_model``)
has its decoder layers on several GPUs, or on a GPU with the rest offloaded to CPU memory or disk
(weights on the ``meta`` device between forwards, streamed in by accelerate's hooks). The engine
traces such a model with the same code as a one-device model; it only has to ask, per module,
*where its computation runs* (:func:`module_device`) and *what its weights are* (:func:`module_weight`,
which fetches offloaded weights from the hook's weight map).

:func:`plan_device_map` places a model over devices with a memory limit per device (``--max-memory
cuda:0=70GiB,cpu=200GiB``), reserving on each GPU the trace's working memory from the memory
model (:mod:`circuits_core.memory`), so a trace does not run out of memory on a device the weights
filled. Layers fill the GPUs in order; what does not fit goes to CPU (offloaded: its weights are
moved to the GPU layer by layer during each pass), then disk.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from circuits_core.errors import InvalidArgument, ResourceExhausted
from circuits_core.memory import format_size, parse_size


def _hooks(module: nn.Module) -> list[Any]:
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", None) or [hook])  # accelerate's SequentialHook holds several


def _as_device(device: Any) -> torch.device:
    if isinstance(device, int):
        return torch.device("cuda", device)
    return torch.device(device)


def module_device(module: nn.Module) -> torch.device:
    """The device ``module``'s forward computes on: its accelerate hook's execution device, else
    its first real (non-meta) parameter's or buffer's device, else its submodules', else cpu."""
    for hook in _hooks(module):
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return _as_device(device)
    for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
        if tensor.device.type != "meta":
            return tensor.device
    for child in module.children():
        device = module_device(child)
        if device.type != "cpu":
            return device
    for tensor in module.parameters():
        if tensor.device.type != "meta":
            return tensor.device
    return torch.device("cpu")


def module_weight(module: nn.Module, name: str = "weight") -> torch.Tensor | None:
    """``module.<name>`` as a real tensor on the module's execution device.

    For a module offloaded by accelerate (parameter on ``meta`` between forwards) the value comes
    from its hook's weight map. None when the module has no such attribute.
    """
    tensor = getattr(module, name, None)
    if tensor is None or tensor.device.type != "meta":
        return tensor
    for hook in _hooks(module):
        weights = getattr(hook, "weights_map", None)
        if weights is not None and name in weights:
            value = weights[name]
            device = getattr(hook, "execution_device", None)
            return value.to(_as_device(device)) if device is not None else value
    raise RuntimeError(f"{type(module).__name__}.{name} is on the meta device and no offload hook holds its value")


def is_dispatched(model: nn.Module) -> bool:
    """True when the model was loaded with a device map that needs hooks (several devices or offload)."""
    return bool(getattr(model, "hf_device_map", None)) and any(_hooks(m) for m in model.modules())


# ------------------------------------------------------------------------------- device maps
_DEVICE_KEY = re.compile(r"^(?:cuda:)?(\d+)$")


def parse_max_memory(text: str | Mapping[str, Any]) -> dict[Any, int]:
    """``cuda:0=70GiB,cpu=200GiB`` (or a mapping) as accelerate's ``max_memory``: {0: bytes, "cpu": bytes}."""
    items: list[tuple[str, Any]]
    if isinstance(text, Mapping):
        items = [(str(k), v) for k, v in text.items()]
    else:
        items = []
        for part in str(text).split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise InvalidArgument(f"--max-memory: expected DEVICE=SIZE pairs (cuda:0=70GiB,cpu=200GiB), got {part.strip()!r}")
            key, value = part.split("=", 1)
            items.append((key.strip(), value.strip()))
    if not items:
        raise InvalidArgument("--max-memory is empty; give DEVICE=SIZE pairs such as cuda:0=70GiB,cpu=200GiB")
    out: dict[Any, int] = {}
    for key, value in items:
        match = _DEVICE_KEY.match(key)
        device: Any = int(match.group(1)) if match else key
        if not match and key not in ("cpu", "disk", "mps"):
            raise InvalidArgument(f"--max-memory: unknown device {key!r} (use cuda:N, N, cpu or disk)")
        out[device] = parse_size(value, what=f"--max-memory {key}")
    return out


def parse_device_map(spec: str | Mapping[str, Any]) -> dict[str, Any]:
    """A device map from a mapping, JSON text or a JSON file: module name -> device.

    Devices: an int GPU index, ``"cuda:N"`` (read as N), ``"cpu"`` or ``"disk"``.
    """
    import json
    from pathlib import Path

    if isinstance(spec, Mapping):
        raw: Any = dict(spec)
    else:
        text = str(spec).strip()
        if not text.startswith("{"):
            path = Path(text).expanduser()
            if not path.is_file():
                raise InvalidArgument(f"--device-map: {text!r} is neither auto, a JSON object nor a JSON file")
            text = path.read_text(encoding="utf-8")
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise InvalidArgument(f"--device-map: not valid JSON ({exc})") from None
    if not isinstance(raw, dict) or not raw:
        raise InvalidArgument("--device-map must map module names to devices, e.g. {\"model.layers.0\": 0, \"lm_head\": \"cpu\"}")
    out: dict[str, Any] = {}
    for name, device in raw.items():
        if isinstance(device, str) and (match := _DEVICE_KEY.match(device)):
            device = int(match.group(1))
        if not (isinstance(device, int) and not isinstance(device, bool) and device >= 0) and device not in ("cpu", "disk", "mps"):
            raise InvalidArgument(f"--device-map: {name!r} -> {device!r} is not a device (use 0, cuda:1, cpu or disk)")
        out[str(name)] = device
    return out


def _bytes_per_layer(model: nn.Module) -> dict[str, int]:
    """Parameter bytes of every direct child that accelerate places as a unit."""
    sizes: dict[str, int] = {}
    for name, param in model.named_parameters():
        sizes[name] = param.numel() * param.element_size()
    return sizes


def plan_device_map(
    model: nn.Module,
    *,
    max_memory: Mapping[Any, int],
    reserve: Mapping[Any, int] | int = 0,
    dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """A device map for ``model`` (real or on the meta device) within ``max_memory`` per device.

    ``reserve`` (bytes, one number for every GPU or a per-device mapping) is kept free on each GPU
    for the trace's working memory; CPU and disk get no reserve. Decoder layers are never split.
    The map follows accelerate's ``infer_auto_device_map``: modules in order fill device 0, then
    1, ..., then cpu, then disk. Raises ResourceExhausted when the model does not fit at all.
    """
    from accelerate import infer_auto_device_map

    limits: dict[Any, int] = {}
    for device, limit in max_memory.items():
        keep = reserve.get(device, 0) if isinstance(reserve, Mapping) else (reserve if isinstance(device, int) else 0)
        limits[device] = max(0, int(limit) - int(keep))
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    device_map = infer_auto_device_map(model, max_memory=limits, no_split_module_classes=no_split, dtype=dtype)
    placed = set(device_map.values())
    total = sum(_bytes_per_layer(model).values())
    if not device_map or not placed <= set(limits) | {"disk"}:
        raise ResourceExhausted(
            f"the model ({format_size(total)} of weights) does not fit in {', '.join(f'{k}={format_size(v)}' for k, v in limits.items())}"
        )
    return dict(device_map)


def device_map_summary(device_map: Mapping[str, Any]) -> str:
    """``cuda:0 layers 0-27, cpu layers 28-63 (+ lm_head)``-style one-line description."""
    by_device: dict[str, list[str]] = {}
    for name, device in device_map.items():
        key = f"cuda:{device}" if isinstance(device, int) else str(device)
        by_device.setdefault(key, []).append(name)
    parts = []
    for device, names in by_device.items():
        layers = sorted(int(m.group(1)) for n in names if (m := re.search(r"layers\.(\d+)$", n)))
        others = [n.rsplit(".", 1)[-1] for n in names if not re.search(r"layers\.\d+$", n)]
        text = device
        if layers:
            text += f" layers {layers[0]}-{layers[-1]}" if len(layers) > 1 else f" layer {layers[0]}"
        if others:
            text += f" (+ {', '.join(others)})"
        parts.append(text)
    return ", ".join(parts)


# ------------------------------------------------------------------------------- host memory
#: Allocations at least this large are served by mmap and unmapped when freed (see below).
HOST_MMAP_THRESHOLD = 128 << 10
_host_memory_returned = False


def return_freed_host_memory() -> bool:
    """Make the C allocator give freed tensor memory back to the OS at once (glibc only).

    glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), after which
    tensors of a few MiB come from the heap, whose freed pages stay in the process: a trace's
    chunks then add up in RSS although the live tensors stay small. Fixing the threshold at
    :data:`HOST_MMAP_THRESHOLD` (``mallopt(M_MMAP_THRESHOLD)``, which also turns the dynamic
    adjustment off) keeps RSS at what the trace holds, so a memory budget on CPU is a bound on RSS
    (docs/memory.md). Called once per process by an engine with a memory budget on CPU. Returns
    False where there is no glibc (the budget then bounds the live tensors only).
    """
    global _host_memory_returned
    if _host_memory_returned:
        return True
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_MMAP_THRESHOLD = -3
    _host_memory_returned = bool(mallopt(M_MMAP_THRESHOLD, HOST_MMAP_THRESHOLD))
    if _host_memory_returned and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)  # what earlier work left on the heap
    return _host_memory_returned
