"""Runtime side of the features: custom ops in the ``vllm_overlap`` library namespace.

Imported only when a patch is applied (the target module is being imported, so torch and
vLLM are loaded already). Each op is registered once per process with vLLM's
``direct_register_custom_op``; layers are passed as vLLM's ``LayerName`` opaque value
(hoisted to a graph input, so one compiled graph serves every layer) where vLLM has it.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from typing import Any

import torch

LIBRARY_NAME = "vllm_overlap"
_library: torch.library.Library | None = None
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

# Set to 1 to run the overlap ops where there is no second stream (the CPU), serially: how the
# tests exercise the op path inside vLLM on machines without a GPU. Read once, at import.
ENV_TEST_OP_PATH = "VLLM_OVERLAP_TEST_OP_PATH"
_OVERLAP_POSSIBLE: bool | None = None


def overlap_possible() -> bool:
    """Whether this platform has a second stream (vLLM's own check for its aux stream).

    A module constant after the first call, so Dynamo treats it as one (it never traces
    stream creation); without a second stream the rewritten code runs the upstream
    statements and costs nothing."""
    global _OVERLAP_POSSIBLE
    if _OVERLAP_POSSIBLE is None:
        from vllm.platforms import current_platform

        _OVERLAP_POSSIBLE = current_platform.is_cuda_alike() or (
            os.environ.get(ENV_TEST_OP_PATH, "") == "1"
        )
    return _OVERLAP_POSSIBLE


def library() -> torch.library.Library:
    global _library
    if _library is None:
        _library = torch.library.Library(LIBRARY_NAME, "FRAGMENT")
    return _library


def has_op(name: str) -> bool:
    return hasattr(torch.ops, LIBRARY_NAME) and hasattr(getattr(torch.ops, LIBRARY_NAME), name)


def register_op(name: str, func: Callable, fake: Callable) -> None:
    """Register ``torch.ops.vllm_overlap.<name>`` once per process (idempotent)."""
    if has_op(name):
        return
    from vllm.utils.torch_utils import direct_register_custom_op

    direct_register_custom_op(name, func, mutates_args=[], fake_impl=fake, target_lib=library())


def register_layer(name: str, layer: torch.nn.Module) -> None:
    """Make ``layer`` findable by name outside a vLLM forward context (tests, benchmarks)."""
    _layers[name] = layer


try:
    from vllm.forward_context import get_forward_context, is_forward_context_available
except ImportError:  # pragma: no cover - every supported vLLM has it

    def is_forward_context_available() -> bool:
        return False


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


def is_lora(proj: torch.nn.Module) -> bool:
    """Whether vLLM's LoRA wraps this projection (per-request punica kernels, which the
    overlay does not run on two streams). vLLM's LoRA layers keep the original as the
    ``base_layer`` submodule; a dict lookup, since hasattr on an nn.Module raises and
    catches an AttributeError (microseconds per call)."""
    return "base_layer" in proj._modules


def any_lora(*projections: torch.nn.Module) -> bool:
    return any(is_lora(p) for p in projections)


def check_output(
    out: torch.Tensor, like: torch.Tensor, width: int, what: str
) -> torch.Tensor:
    """The real op must return exactly what the fake kernel promised."""
    expected = (*like.shape[:-1], width)
    if tuple(out.shape) != expected or out.dtype != like.dtype:
        raise RuntimeError(
            f"vllm-overlap: {what} returned {tuple(out.shape)} {out.dtype}, the fake kernel "
            f"promised {expected} {like.dtype}; turn this feature off and report it"
        )
    return out.contiguous()
