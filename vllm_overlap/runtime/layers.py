"""How an op finds its layer again: vLLM's ``LayerName`` and the overlay's layer registry.

A layer goes into a custom op as vLLM's ``LayerName`` opaque value where vLLM has it (hoisted
to a graph input, so one compiled graph serves every layer), and comes out of vLLM's forward
context, or of the weak registry below for modules vLLM does not keep there (the legacy
DeepSeek ``Indexer``; tests and benchmarks).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

_layers: "weakref.WeakValueDictionary[str, torch.nn.Module]" = weakref.WeakValueDictionary()

try:  # vLLM >= 0.31 on torch >= 2.11: an opaque, hoisted value type
    from vllm.utils.torch_utils import LayerNameType, _encode_layer_name, _resolve_layer_name
except ImportError:  # older vLLM: a plain string (one graph per layer; nothing better exists)
    LayerNameType = str  # type: ignore[misc]

    def _encode_layer_name(layer_name: str) -> str:
        return layer_name

    def _resolve_layer_name(layer_name: str) -> str:
        return layer_name


encode_layer_name = _encode_layer_name

try:
    from vllm.forward_context import get_forward_context, is_forward_context_available
except ImportError:  # pragma: no cover - every supported vLLM has it

    def is_forward_context_available() -> bool:
        return False


def register_layer(name: str, layer: torch.nn.Module) -> None:
    """Make ``layer`` findable by name outside a vLLM forward context."""
    _layers[name] = layer


def registered_layers() -> dict[str, torch.nn.Module]:
    """What the registry holds now (a copy)."""
    return dict(_layers)


def forget_layers() -> None:
    """Empty the registry (tests)."""
    _layers.clear()


def resolve_layer(layer_name: Any) -> Any:
    """The module behind a ``LayerName`` (or str), from vLLM's forward context first."""
    name = _resolve_layer_name(layer_name)
    if is_forward_context_available():
        layer = get_forward_context().no_compile_layers.get(name)
        if layer is not None:
            return layer
    layer = _layers.get(name)
    if layer is None:
        raise KeyError(f"vllm-overlap: no layer named {name!r} in the forward context")
    return layer


def per_rank_width(value: Any) -> int:
    """An output width from the outputs spec: an int, or a vLLM linear layer's per-rank output
    size set at init (``ReplicatedLinear`` has no partition), never its (repackable) weight."""
    if isinstance(value, int):
        return value
    width = getattr(value, "output_size_per_partition", None)
    return value.output_size if width is None else width
