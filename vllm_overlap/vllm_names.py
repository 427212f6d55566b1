"""Every vLLM name the overlay's runtime reads, and what the runtime does where a vLLM release
does not have it. ``vllm-overlap doctor`` looks each one up in the installed vLLM and says
``present``, or ``absent: <what happens instead>``; a test checks that every ``from vllm...
import`` in the runtime is listed here.

The runtime never fails on a missing name: each lookup has the fallback said here, and a
missing name a site cannot do without skips that site with this reason.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class VllmName:
    module: str
    name: str
    without: str  # what the runtime does where this vLLM lacks it


NAMES = (
    VllmName("vllm.platforms", "current_platform", "no second stream assumed: every site serial"),
    VllmName("vllm.utils.torch_utils", "aux_stream", "no aux stream: every site runs serially"),
    VllmName(
        "vllm.utils.multi_stream_utils",
        "maybe_execute_in_parallel",
        "the overlay's own fork/join (without vLLM's breakable-capture check)",
    ),
    VllmName(
        "vllm.utils.multi_stream_utils",
        "execute_in_parallel",
        "sites of three or more branches fan out with the overlay's own copy (0.20.0 lacks it)",
    ),
    VllmName(
        "vllm.compilation.breakable_cudagraph",
        "BreakableCUDAGraphCapture",
        "no breakable CUDA-graph capture in this vLLM: none to detect",
    ),
    VllmName("vllm.v1.worker.ubatching", "dbo_enabled", "no dual-batch overlap in this vLLM: none to detect"),
    VllmName(
        "vllm.utils.torch_utils",
        "direct_register_custom_op",
        "op sites cannot register their op: skipped with this reason",
    ),
    *(
        VllmName("vllm.utils.torch_utils", name, "layer names are plain strings: one graph per layer")
        for name in ("LayerNameType", "_encode_layer_name", "_resolve_layer_name")
    ),
    *(
        VllmName("vllm.forward_context", name, "layers found only in the overlay's registry")
        for name in ("get_forward_context", "is_forward_context_available")
    ),
    VllmName(
        "vllm.model_executor.layers.linear",
        "UnquantizedLinearMethod",
        "gdn_in_proj mode fused fuses nothing (its layers run the fallback)",
    ),
    VllmName(
        "vllm.model_executor.layers.linear",
        "MergedColumnParallelLinear",
        "gdn_in_proj mode fused fuses nothing (its layers run the fallback)",
    ),
    VllmName(
        "vllm.model_executor.model_loader.utils",
        "process_weights_after_loading",
        "no post-load step: no census, and mode fused runs its fallback",
    ),
    VllmName("vllm.logger", "init_logger", "the overlay logs through Python's logging"),
)


def look_up(entry: VllmName) -> str:
    """``present``, or ``absent: <what the runtime does instead>`` for the installed vLLM."""
    try:
        module = importlib.import_module(entry.module)
    except Exception:
        return f"absent: {entry.without}"
    return "present" if hasattr(module, entry.name) else f"absent: {entry.without}"


def report() -> list[dict]:
    return [{"name": f"{e.module}.{e.name}", "status": look_up(e)} for e in NAMES]


_said = False


def log_absent_once() -> list[str]:
    """Log, once per process, each name this vLLM lacks and the fallback the runtime takes for
    it (called after loading, when vLLM's modules are imported); returns the lines logged."""
    global _said
    if _said:
        return []
    _said = True
    from .log import logger

    lines = []
    for entry in NAMES:
        status = look_up(entry)
        if status != "present":
            lines.append(f"vllm-overlap: this vLLM has no {entry.module}.{entry.name}: {entry.without}")
            logger().warning("%s", lines[-1])
    return lines
