"""Stream-safe kernels only: the allowlist's decision for every linear method class this vLLM
has, and for the kernels a quantised method dispatches to (by what each kernel does: a
per-device workspace means serial, anything unknown means serial)."""

from __future__ import annotations

import functools
import importlib
import pkgutil

import pytest
import torch

from vllm_overlap.runtime import stream_safety
from vllm_overlap.runtime.stream_safety import method_verdict, verdict

# From reading vLLM 0.33.0's linear methods (not from the code under test): the only methods
# whose own GEMM needs no kernel object and shares nothing per device.
SAFE_BY_THEMSELVES = {"UnquantizedLinearMethod", "AutoAWQLinearMethod", "HummingLinearMethod"}


def _linear_method_classes() -> list[type]:
    from vllm.model_executor.layers import linear, quantization
    from vllm.model_executor.layers.linear import LinearMethodBase

    for info in pkgutil.walk_packages(quantization.__path__, quantization.__name__ + "."):
        try:
            importlib.import_module(info.name)
        except Exception:  # CUDA-only modules of the CPU build: their classes are not here
            pass
    found, todo = {}, [LinearMethodBase]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub.__module__.startswith("vllm.") and sub not in found.values():
                found[f"{sub.__module__}.{sub.__qualname__}"] = sub
                todo.append(sub)
    assert linear.UnquantizedLinearMethod in found.values()
    return sorted(found.values(), key=lambda c: c.__qualname__)


CLASSES = _linear_method_classes()


def _layer(method) -> torch.nn.Module:
    layer = torch.nn.Module()
    layer.quant_method = method
    return layer


def test_this_vllm_has_many_linear_methods():
    assert len(CLASSES) >= 15, [c.__qualname__ for c in CLASSES]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__qualname__)
def test_each_linear_method_class_has_a_decision(cls):
    """Safe only where the method itself is known safe; a method that dispatches to a kernel
    and has none chosen, or any other class, runs serially with a reason naming it."""
    # (a bare instance: abstract bases cannot be made, and the decision reads the class's name
    # and the kernel attributes, none of which are set here)
    method = type(cls.__name__, (), {})()
    reason = method_verdict(_layer(method), method)
    if cls.__name__ in SAFE_BY_THEMSELVES:
        assert reason == ""
    else:
        assert reason.startswith(cls.__name__) and reason != cls.__name__, reason


def _kernel(name: str):
    return type(name, (), {})()  # the decision is by the kernel's class name


def _delegating(kernel=None, attr="fp8_linear", **extra):
    method = type("Fp8LinearMethod", (), {})()
    if kernel is not None:
        setattr(method, attr, kernel)
    for key, value in extra.items():
        setattr(method, key, value)
    return method


@pytest.mark.parametrize(
    "kernel, safe",
    [
        ("CutlassFP8ScaledMMLinearKernel", True),
        ("PerTensorTorchFP8ScaledMMLinearKernel", True),
        ("TritonFp8BlockScaledMMKernel", True),
        ("DeepGemmFp8BlockScaledMMKernel", True),
        ("FlashInferFP8ScaledMMLinearKernel", False),  # FlashInfer's per-device workspace
        ("FlashInferCutlassNvFp4LinearKernel", False),
        ("B12xNvFp4LinearKernel", False),  # shared per-shape plans
        ("MarlinLinearKernel", False),  # per-stream locks, locked after warm-up: unproven
        ("SomeNewKernel", False),  # unknown: default deny
    ],
)
def test_a_quantised_method_is_judged_by_the_kernel_it_dispatches_to(kernel, safe):
    method = _delegating(_kernel(kernel))
    reason = method_verdict(_layer(method), method)
    assert (reason == "") == safe, reason
    if not safe:
        assert kernel in reason


def test_every_kernel_attribute_and_sub_kernel_counts():
    for attr in stream_safety.KERNEL_ATTRS:
        method = _delegating(_kernel("CutlassFP8ScaledMMLinearKernel"), attr=attr)
        assert method_verdict(_layer(method), method) == ""
    outer = _kernel("FlashInferFp8DeepGEMMDynamicBlockScaledKernel")
    outer.base, outer.fallback = _kernel("DeepGemmFp8BlockScaledMMKernel"), _kernel("FlashInferFP8ScaledMMLinearKernel")
    method = _delegating(outer)
    assert "FlashInferFp8DeepGEMMDynamicBlockScaledKernel" in method_verdict(_layer(method), method)


def test_compressed_tensors_keeps_its_kernel_on_the_layers_scheme():
    method = type("CompressedTensorsLinearMethod", (), {})()
    layer = _layer(method)
    layer.scheme = type("Scheme", (), {})()
    layer.scheme.kernel = _kernel("MacheteLinearKernel")
    assert method_verdict(layer, method) == ""
    layer.scheme.kernel = _kernel("FlashInferTrtllmNvFp4LinearKernel")
    assert "workspace" in method_verdict(layer, method)


def test_unquantized_on_flashinfers_bf16_gemm_runs_serially():
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    def cuda_flashinfer_bf16_gemm(*args):  # stands for vLLM's, found by name
        raise AssertionError

    method = object.__new__(UnquantizedLinearMethod)
    method._gemm_impl = functools.partial(cuda_flashinfer_bf16_gemm, None)
    assert "FlashInfer's bf16 GEMM" in method_verdict(_layer(method), method)
    method._gemm_impl = torch.nn.functional.linear
    assert method_verdict(_layer(method), method) == ""


def test_a_module_is_judged_by_every_linear_layer_below_it_and_keeps_the_verdict():
    safe = _layer(_delegating(_kernel("CutlassFP8ScaledMMLinearKernel")))
    unsafe = _layer(_delegating(_kernel("FlashInferFP8ScaledMMLinearKernel")))
    parent = torch.nn.Module()
    parent.a, parent.b = safe, unsafe
    assert "FlashInferFP8ScaledMMLinearKernel" in verdict(parent)
    assert verdict(safe) == ""
    assert parent.__dict__[stream_safety.VERDICT] == verdict(parent)  # asked once
    assert stream_safety.first_unsafe((safe, parent)) == verdict(parent)
    assert stream_safety.first_unsafe((safe,)) == ""
