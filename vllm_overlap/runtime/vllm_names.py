"""Every vLLM name the overlay wraps or reads at run time, and what it does where a vLLM release
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
    name: str  # an attribute of the module; dotted for a class's member ("VllmConfig.compute_hash")
    without: str  # what the runtime does where this vLLM lacks it
    # Names that stand in for one another across releases share a group: a release needs one
    # of them (the compile-cache key: compute_hash up to 0.33, compile_factors from 0.34).
    one_of: str = ""
    # Read only where a newer release has it (vLLM 0.34's own GDN overlap): absent is normal
    # on older ones.
    since: str = ""


NAMES = (
    VllmName("vllm.platforms", "current_platform", "no second stream assumed: every site serial"),
    VllmName("vllm.utils.torch_utils", "aux_stream", "no aux stream: every site runs serially"),
    VllmName(
        "vllm.utils.multi_stream_utils",
        "execute_in_parallel",
        "every fork/join (the pair's, aux first, and the fan-out's) runs the overlay's own copy (0.20.0 lacks it)",
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
    # Wrapped (hooks.wrap): the compile-cache key (cache_key.py).
    *(
        VllmName(
            "vllm.config.vllm",
            f"VllmConfig.{name}",
            "the key goes into the other method; with neither, every site whose traced code "
            "differs under torch.compile is skipped",
            one_of="compile-cache key",
        )
        for name in ("compute_hash", "compile_factors")
    ),
    # vLLM 0.34's own GDN overlap, turned on for layers that did not opt in (runtime/gdn_upstream.py).
    VllmName(
        "vllm.config.vllm",
        "get_current_vllm_config_or_none",
        "upstream's GDN conditions cannot be checked: layers not opted in stay serial",
    ),
    VllmName(
        "vllm.model_executor.layers.mamba.gdn.qwen_gdn_linear_attn",
        "cuda_unquantized_gemm",
        "no upstream GDN overlap in this vLLM (before 0.34): the overlay's rewrite runs forward_cuda",
        since="0.34.0",
    ),
)

# Attributes the runtime reads on vLLM's objects (not importable names): where each is missing
# on an object, the runtime takes the fallback said.
INSTANCE_ATTRIBUTES = {
    "QwenGatedDeltaNetAttention._ba_stream / _ba_events": (
        "set as upstream's __init__ sets them (0.34+); a layer without _ba_stream has no upstream path: serial"
    ),
    "QwenGatedDeltaNetAttention._forward_method": "the census cannot tell which forward runs: counted serial",
    "ParallelConfig.use_ubatching / VllmConfig.lora_config": "upstream's GDN path is left off (its conditions unknown)",
    "UnquantizedLinearMethod._gemm_impl": "stream_safety and upstream's GDN condition: not plain cuBLAS, serial",
    "Module.do_not_compile": "set by @support_torch_compile; without it a layer is taken to run eagerly",
}


def look_up(entry: VllmName) -> str:
    """``present``, or ``absent: <what the runtime does instead>`` for the installed vLLM."""
    try:
        found = importlib.import_module(entry.module)
        for part in entry.name.split("."):
            found = vars(found)[part] if isinstance(found, type) else getattr(found, part)
    except Exception:
        return f"absent: {entry.without}"
    return "present"


def listed(module: str, name: str) -> bool:
    """Whether ``module.name`` is declared here."""
    return any(e.module == module and e.name == name for e in NAMES)


NOT_NEEDED = "not in this release, and not needed here"


def report() -> list[dict]:
    """Per name: ``present``; ``absent: <fallback>``; or :data:`NOT_NEEDED` (a newer release's
    name, or one whose stand-in in its ``one_of`` group is present)."""
    statuses = {e: look_up(e) for e in NAMES}
    present = {e.one_of for e, status in statuses.items() if e.one_of and status == "present"}
    rows = []
    for e, status in statuses.items():
        if status != "present" and (e.since or e.one_of in present):
            status = NOT_NEEDED
        rows.append({"name": f"{e.module}.{e.name}", "status": status})
    return rows


_said = False


def log_absent_once() -> list[str]:
    """Log, once per process, each name this vLLM lacks and the fallback the runtime takes for
    it (called after loading, when vLLM's modules are imported); returns the lines logged."""
    global _said
    if _said:
        return []
    _said = True
    from vllm_overlap.log import logger

    lines = []
    for entry, row in zip(NAMES, report()):
        if row["status"].startswith("absent"):
            lines.append(f"vllm-overlap: this vLLM has no {entry.module}.{entry.name}: {entry.without}")
            logger().warning("%s", lines[-1])
    return lines
