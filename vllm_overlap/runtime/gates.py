"""The checks every site's decision ladder shares: is there a second stream, is a projection
LoRA-wrapped."""

from __future__ import annotations

import os
from typing import Any

# Set to 1 to run the overlap ops where there is no second stream (the CPU), serially: how the
# tests exercise the op path inside vLLM on machines without a GPU. Read once.
ENV_TEST_OP_PATH = "VLLM_OVERLAP_TEST_OP_PATH"
_OVERLAP_POSSIBLE: bool | None = None


def overlap_possible() -> bool:
    """Whether this platform has a second stream (vLLM's own check for its aux stream).

    A module constant after the first call, so Dynamo treats it as one (it never traces
    stream creation); without a second stream the rewritten code runs the upstream
    statements and costs nothing."""
    global _OVERLAP_POSSIBLE
    if _OVERLAP_POSSIBLE is None:
        try:
            from vllm.platforms import current_platform
        except ImportError:  # (vllm_names: no second stream assumed)
            _OVERLAP_POSSIBLE = False
            return False
        _OVERLAP_POSSIBLE = current_platform.is_cuda_alike() or (
            os.environ.get(ENV_TEST_OP_PATH, "") == "1"
        )
    return _OVERLAP_POSSIBLE


def set_overlap_possible(value: bool | None) -> bool | None:
    """Override the platform check (benchmarks and tests); returns the previous value."""
    global _OVERLAP_POSSIBLE
    before, _OVERLAP_POSSIBLE = _OVERLAP_POSSIBLE, value
    return before


def is_lora(module: Any) -> bool:
    """Whether vLLM's LoRA wraps this module (per-request punica kernels, which the overlay
    does not run on two streams). vLLM's LoRA layers keep the original as the ``base_layer``
    submodule; a dict lookup, since hasattr on an nn.Module raises and catches an
    AttributeError (microseconds per call)."""
    modules = getattr(module, "_modules", None)
    return modules is not None and "base_layer" in modules


def any_lora(modules: tuple) -> bool:
    for module in modules:
        if is_lora(module):
            return True
    return False
