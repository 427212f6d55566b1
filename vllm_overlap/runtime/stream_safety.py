"""Stream-safe kernels only: two GEMMs run concurrently only when each layer's linear method
(and the kernel it dispatches to) keeps no scratch buffer shared by every call on the device.

A GEMM whose kernel takes a per-device workspace (FlashInfer's ``_get_cache_buf``: its FP4,
MXFP8 and FP8 GEMMs, its bf16 cuBLASLt runner; b12x's per-shape plans) would race with itself
or another layer's GEMM on the other stream. The allowlist below is default-deny: a method or
kernel not named on it runs upstream's statements serially, and the census says which layers
and why. Each entry names why it is safe (read from vLLM 0.33.0's source and its kernels';
see docs/stream-safety.md). Nothing here imports a quantisation module: classes are
told apart by name, so an entry of a release that lacks the class costs nothing.

The verdict of a module a branch calls is kept on it (``VERDICT``) the first time it is asked
outside torch.compile (the census asks after loading), so the ladder's per-call check is one
attribute read.
"""

from __future__ import annotations

import functools
from typing import Any

VERDICT = "_vllm_overlap_stream_unsafe"  # on a linear layer: "" (safe) or the reason
_UNKNOWN = object()

# Linear methods whose GEMM keeps no per-device shared buffer, and why.
SAFE_METHODS = {
    "UnquantizedLinearMethod": "F.linear through cuBLAS, whose workspace PyTorch keeps per (handle, stream)",
    "AutoAWQLinearMethod": "awq_gemm allocates its scratch per call",
    "HummingLinearMethod": "its lock arrays are per layer",
}
# Kernels (what a quantised method dispatches to: ``.kernel``, ``.fp8_linear``, ...) known
# to allocate their scratch per call or use cuBLAS's per-stream workspace.
SAFE_KERNELS = {
    **dict.fromkeys(
        (
            "CutlassFP8ScaledMMLinearKernel",
            "CutlassInt8ScaledMMLinearKernel",
            "CutlassFp8BlockScaledMMKernel",
            "CutlassNvFp4LinearKernel",
            "CutlassW4A8LinearKernel",
            "MacheteLinearKernel",
        ),
        "CUTLASS / Machete: workspace allocated per call by PyTorch's caching allocator",
    ),
    **dict.fromkeys(
        (
            "PerTensorTorchFP8ScaledMMLinearKernel",
            "RowWiseTorchFP8ScaledMMLinearKernel",
            "ChannelWiseTorchFP8ScaledMMLinearKernel",
            "BlockWiseTorchFP8ScaledMMLinearKernel",
            "TorchNvFp4LinearKernel",
            "TorchMxFp8LinearKernel",
        ),
        "torch._scaled_mm: cuBLASLt workspace kept per (handle, stream) by PyTorch",
    ),
    **dict.fromkeys(
        (
            "TritonFP8ScaledMMLinearKernel",
            "TritonInt8ScaledMMLinearKernel",
            "TritonFp8BlockScaledMMKernel",
            "TritonW4A16LinearKernel",
            "ConchLinearKernel",
            "ExllamaLinearKernel",
        ),
        "Triton / exllama: no state shared between calls",
    ),
    "DeepGemmFp8BlockScaledMMKernel": "DeepGEMM allocates its split-K scratch per call",
    **dict.fromkeys(
        (
            "EmulationNvFp4LinearKernel",
            "EmulationMxfp4LinearKernel",
            "EmulationMxfp6LinearKernel",
            "EmulationMxfp8LinearKernel",
        ),
        "emulation: dequantise, then F.linear",
    ),
}
# Named because users will ask: why these run serially.
UNSAFE = {
    **dict.fromkeys(
        (
            "FlashInferFP8ScaledMMLinearKernel",
            "FlashInferCutlassNvFp4LinearKernel",
            "FlashInferTrtllmNvFp4LinearKernel",
            "FlashInferCudnnNvFp4LinearKernel",
            "FlashInferCuteDslNvFp4W4A16LinearKernel",
            "FlashInferCutlassMxfp8LinearKernel",
            "FlashInferTrtllmMxfp8LinearKernel",
            "QutlassNvFP4LinearMethod",
        ),
        "FlashInfer GEMM with one workspace per device (mm_fp4_workspace / _get_cache_buf)",
    ),
    **dict.fromkeys(
        (
            "B12xNvFp4LinearKernel",
            "B12xNvFp4W4A16LinearKernel",
            "B12xMxFp4LinearKernel",
            "B12xMxfp8LinearKernel",
            "B12xTensorFP8ScaledMMLinearKernel",
            "B12xFp8BlockScaledMMKernel",
            "ModelOptBlockQuantLinearMethod",
        ),
        "b12x plans (and their scratch) are shared by every layer of one shape",
    ),
    **dict.fromkeys(
        (
            "MarlinLinearKernel",
            "MarlinFP8ScaledMMLinearKernel",
            "MarlinNvFp4LinearKernel",
            "MarlinMxFp4LinearKernel",
            "MarlinMxfp8LinearKernel",
        ),
        "Marlin's lock workspace is per stream and locked after warm-up; not yet proven on a GPU",
    ),
}
KERNEL_ATTRS = ("kernel", "fp8_linear", "linear_kernel", "ocp_mx_linear")
FLASHINFER_BF16 = "cuda_flashinfer_bf16_gemm"


def _kernel_holder(layer: Any, method: Any) -> Any:
    name = type(method).__name__
    if name in ("CompressedTensorsLinearMethod", "QuarkLinearMethod"):
        return getattr(layer, "scheme", None)
    if name == "INCLinearMethod":
        scheme = getattr(method, "scheme", None)
        return getattr(scheme, "linear_method", scheme)
    return method


def method_verdict(layer: Any, method: Any) -> str:
    """"" if ``method`` (the linear method of ``layer``) may run beside another GEMM on another
    stream, else why not."""
    name = type(method).__name__
    if name in UNSAFE:
        return f"{name}: {UNSAFE[name]}"
    if name == "UnquantizedLinearMethod":
        gemm = getattr(method, "_gemm_impl", None)
        if isinstance(gemm, functools.partial) and getattr(gemm.func, "__name__", "") == FLASHINFER_BF16:
            return f"{name} on FlashInfer's bf16 GEMM: its cuBLASLt runner's workspace is per device"
        return ""
    if name in SAFE_METHODS:
        return ""
    if name == "CompressedTensorsLinearTransformMethod":  # its transforms are per-layer modules
        inner = getattr(method, "quant_method", None)
        reason = method_verdict(layer, inner) if inner is not None else "no inner method"
        return f"{name} over {reason}" if reason else ""
    holder = _kernel_holder(layer, method)
    kernel = next((k for a in KERNEL_ATTRS if (k := getattr(holder, a, None)) is not None), None)
    if kernel is None:
        return f"{name}: not on the stream-safe allowlist"
    for part in (kernel, getattr(kernel, "base", None), getattr(kernel, "fallback", None)):
        if part is None:
            continue
        kind = type(part).__name__
        if kind in UNSAFE:
            return f"{name} with {kind}: {UNSAFE[kind]}"
        if kind not in SAFE_KERNELS:
            return f"{name} with {kind}: not on the stream-safe allowlist"
    return ""


def verdict(module: Any) -> str:
    """"" if every linear layer in ``module`` (itself or below) is stream-safe, else the first
    reason. Kept on the module once computed outside torch.compile: one attribute read after."""
    import torch

    cached = getattr(module, VERDICT, _UNKNOWN)
    if cached is not _UNKNOWN:
        return cached
    reason = ""
    for linear in module.modules() if isinstance(module, torch.nn.Module) else (module,):
        method = getattr(linear, "quant_method", None)
        if method is not None:
            reason = method_verdict(linear, method)
            if reason:
                break
    if isinstance(module, torch.nn.Module) and not torch.compiler.is_compiling():
        module.__dict__[VERDICT] = reason
    return reason


def first_unsafe(modules: tuple) -> str:
    """The reason the first module the branches call is not stream-safe ("" if all are)."""
    for module in modules:
        reason = verdict(module)
        if reason:
            return reason
    return ""
