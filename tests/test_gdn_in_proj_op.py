"""torch.ops.vllm_overlap.gdn_in_proj: opcheck, exact fake kernel, and torch.compile behaviour."""

from __future__ import annotations

import pytest
import torch

from conftest import site_entry
from vllm_overlap.runtime.layers import encode_layer_name

TOKEN_COUNTS = [0, 1, 7, 256, 1025]


def _args(layer, num_tokens, dtype):
    hidden = torch.randn(num_tokens, layer.hidden_size, dtype=dtype)
    return (
        hidden,
        layer.in_proj_qkvz.output_size_per_partition,
        layer.in_proj_ba.output_size_per_partition,
        encode_layer_name(layer.prefix),
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("num_tokens", TOKEN_COUNTS)
def test_opcheck(gdn_layer, num_tokens, dtype):
    layer = gdn_layer(dtype=dtype)
    torch.library.opcheck(torch.ops.vllm_overlap.gdn_in_proj.default, _args(layer, num_tokens, dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("num_tokens", TOKEN_COUNTS)
@pytest.mark.parametrize("interleaved", [True, False], ids=["qwen3-next", "qwen3.5"])
def test_fake_kernel_matches_real_outputs(gdn_layer, num_tokens, dtype, interleaved):
    """Shapes, dtypes and strides of the fake kernel equal those of the real op."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    layer = gdn_layer(interleaved=interleaved, dtype=dtype)
    args = _args(layer, num_tokens, dtype)
    real = torch.ops.vllm_overlap.gdn_in_proj(*args)
    with FakeTensorMode() as mode:
        fake_hidden = mode.from_tensor(args[0])
        fake = torch.ops.vllm_overlap.gdn_in_proj(fake_hidden, *args[1:])
    for r, f in zip(real, fake):
        assert (tuple(f.shape), f.dtype, f.stride()) == (tuple(r.shape), r.dtype, r.stride())
    # and the real outputs are what the two projections compute
    assert torch.equal(real[0], layer.in_proj_qkvz(args[0])[0])
    assert torch.equal(real[1], layer.in_proj_ba(args[0])[0])


def test_real_op_refuses_an_output_the_fake_did_not_promise(gdn_layer):
    layer = gdn_layer()
    hidden, qkvz_width, ba_width, name = _args(layer, 3, torch.bfloat16)
    with pytest.raises(RuntimeError, match="fake kernel promised"):
        torch.ops.vllm_overlap.gdn_in_proj(hidden, qkvz_width + 1, ba_width, name)


class _Stack(torch.nn.Module):
    """N GDN layers' input projections called in sequence, like the decoder stack does."""

    def __init__(self, layers):
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)

    def forward(self, hidden):
        in_proj = site_entry("gdn_in_proj")
        total = hidden.new_zeros(())
        for layer in self.layers:
            qkvz, ba = in_proj(layer, hidden)
            total = total + qkvz.float().sum() + ba.float().sum()
        return total


def _compile_and_run(stack, token_counts):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(stack, backend=counter, fullgraph=True, dynamic=True)
    for n in token_counts:
        hidden = torch.randn(n, stack.layers[0].hidden_size, dtype=torch.bfloat16)
        torch.testing.assert_close(compiled(hidden), stack(hidden), rtol=0, atol=0)
    return counter


@pytest.mark.parametrize("num_layers", [2, 4])
def test_fullgraph_dynamic_tokens_one_graph_per_stack(gdn_layer, num_layers):
    """fullgraph=True (no graph break), one graph for all token counts, whatever the depth."""
    stack = _Stack([gdn_layer() for _ in range(num_layers)])
    counter = _compile_and_run(stack, [3, 7, 64])
    assert counter.frame_count == 1
    graph = counter.graphs[0]
    op = torch.ops.vllm_overlap.gdn_in_proj
    ops = [n for n in graph.graph.nodes if n.target in (op, op.default)]
    assert len(ops) == num_layers


def test_layer_names_are_graph_inputs_not_constants(gdn_layer):
    """LayerName is hoisted: the graph's code names no layer, so every layer's slice of the
    graph is identical (a str name is baked in per layer: upstream's 4x cold-compile bug)."""
    import vllm.utils.torch_utils as tu

    if not getattr(tu, "_USE_LAYERNAME", False):
        pytest.skip("this vLLM/torch has no opaque LayerName; names are plain strings")
    layers = [gdn_layer() for _ in range(3)]
    counter = _compile_and_run(_Stack(layers), [5])
    code = counter.graphs[0].code
    assert not any(layer.prefix in code for layer in layers), code


def test_str_layer_names_would_be_baked_in(gdn_layer, monkeypatch):
    """Negative control for the test above: with plain strings the names appear as constants."""
    from vllm_overlap.runtime import layers as ops

    layers = [gdn_layer() for _ in range(2)]
    monkeypatch.setattr(ops, "encode_layer_name", lambda name: name)
    try:
        counter = _compile_and_run(_Stack(layers), [5])
    except Exception as exc:  # the op's schema may refuse a str where it wants LayerName
        pytest.skip(f"op schema does not take a str here: {type(exc).__name__}")
    assert all(layer.prefix in counter.graphs[0].code for layer in layers)
