"""vLLM 0.34's own GDN overlap, turned on for the layers whose model did not opt in.

From 0.34, ``QwenGatedDeltaNetAttention.forward_cuda`` forks ``in_proj_ba`` onto
``aux_stream()`` beside ``in_proj_qkvz`` itself (``execute_in_parallel``, aux first, at most
256 tokens, only while a CUDA graph is captured) when the layer's ``_ba_stream`` is set. Upstream
sets it in ``__init__`` only where the model asks (``overlap_ba_proj=True``: Qwen3.5 on NVIDIA)
and its own conditions hold: CUDA, an unquantized ``in_proj_ba`` on plain cuBLAS
(``cuda_unquantized_gemm``: FlashInfer GEMMs share a workspace), no ubatching, no LoRA. Its
comment: the path is for callers outside torch.compile (compiled callers would need a custom
op; not validated upstream).

So the overlay, where ``forward_cuda`` is upstream's (``outcomes.UPSTREAM``), per layer:
- ``_ba_stream`` already set: upstream overlaps this natively; nothing to do;
- otherwise, where every one of upstream's conditions holds and the layer does not run under
  torch.compile, sets ``_ba_stream`` and ``_ba_events`` exactly as upstream's ``__init__``
  would, so upstream's own statements fork;
- otherwise the layer runs serially, and :func:`settle` says why.
The overlay's own rewrite never runs on such a layer (forward_cuda is not rewritten): never
two forks of one pair.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

NATIVE = "upstream overlaps this natively (the model opted in)"
TURNED_ON = (
    "upstream's own _ba_stream path, turned on by the overlay "
    "(upstream's limits: <= 256 tokens, during CUDA-graph capture)"
)


def _vllm_config():
    try:
        from vllm.config.vllm import get_current_vllm_config_or_none
    except ImportError:
        return None
    return get_current_vllm_config_or_none()


def refusal(layer: Any, compiled: bool) -> str:
    """Why upstream's path cannot be turned on for ``layer`` ("" where it can): upstream's own
    conditions, read where upstream reads them, and the overlay's (outside torch.compile)."""
    if not hasattr(layer, "_ba_stream"):
        return "serial: this layer has no upstream _ba_stream path"
    if compiled:
        return (
            "serial: runs under torch.compile, where upstream's _ba_stream path is not "
            "validated (upstream: compiled callers need a custom op)"
        )
    from vllm.platforms import current_platform

    if not current_platform.is_cuda():
        return "serial: upstream's _ba_stream path is CUDA only"
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    plain = getattr(sys.modules.get(type(layer).__module__), "cuda_unquantized_gemm", None)
    method = getattr(getattr(layer, "in_proj_ba", None), "quant_method", None)
    if (
        plain is None
        or not isinstance(method, UnquantizedLinearMethod)
        or getattr(method, "_gemm_impl", None) is not plain
    ):
        return "serial: in_proj_ba is not an unquantized GEMM on plain cuBLAS (upstream's condition)"
    config = _vllm_config()
    if config is None:
        return "serial: vLLM's config is not readable here, so upstream's conditions cannot be checked"
    if getattr(config.parallel_config, "use_ubatching", True):
        return "serial: ubatching is on (upstream's condition)"
    if config.lora_config is not None:
        return "serial: LoRA is on (upstream's condition)"
    return ""


def settle(layer: Any, compiled: bool, aux_stream: Any) -> tuple[bool, str]:
    """(overlaps, why) for a layer whose forward_cuda is upstream's, turning upstream's path on
    where it may."""
    if getattr(layer, "_ba_stream", None) is not None:
        return True, NATIVE
    if aux_stream is None:
        return False, "serial: no aux stream"
    why = refusal(layer, compiled)
    if why:
        return False, why
    layer._ba_events = (torch.cuda.Event(), torch.cuda.Event())
    layer._ba_stream = aux_stream
    return True, TURNED_ON
