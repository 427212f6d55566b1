"""Layer-level differential test of kv_a_proj on the real vLLM MiniCPM3 attention layer.

The same tiny ``MiniCPM3Attention`` (seeded weights) and inputs go through upstream's forward
and the rewritten one. Its attention kernel needs the engine's metadata, so ``layer.attn`` is
a counted plain-torch stand-in whose output depends on every element of q, k and v: the
whole forward around the site (the head view, the rope split, the in-place rope write into
q, k's assembly, the output projection) is compared bit for bit, eager and under
torch.compile, and only the rewritten forward may go through the stream primitive.
"""

from __future__ import annotations

import pytest
import torch
from conftest import functions

from vllm_overlap.engine import rewrite
from vllm_overlap.sites.kv_a_proj import MINICPM3

TARGET = MINICPM3.targets[0]




class AttentionStandin(torch.nn.Module):
    """q, k, v (tokens, heads * head_dim) -> a mix of all three, same shape; counts calls.
    Keeps the real layer's name (the site finds its layer by it)."""

    def __init__(self, layer_name: str):
        super().__init__()
        self.layer_name = layer_name
        self.calls = 0

    def forward(self, q, k, v):
        self.calls += 1
        return (q.float() * 0.5 + k.float().roll(1, dims=-1) * 0.25 + v.float().flip(-1) * 0.125).to(q.dtype)


def _layer(minicpm3_vllm, dtype=torch.bfloat16):
    from vllm_overlap.testing.layer_builders import build_minicpm3_attention
    from vllm_overlap.testing.tiny_models import minicpm3_config

    hf = minicpm3_config()
    layer = build_minicpm3_attention(minicpm3_vllm, hf, dtype=dtype, seed=3)
    layer.attn = AttentionStandin(layer.attn.layer_name)
    return layer, hf


def _inputs(hf, tokens, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(tokens)
    positions = torch.randint(0, hf.max_position_embeddings, (tokens,), generator=gen)
    return positions, torch.randn(tokens, hf.hidden_size, generator=gen).to(dtype)


@pytest.fixture
def overlay_applied(overlay_applied):
    """The plugin registered and MiniCPM3's module imported (so rewritten)."""
    import importlib

    importlib.import_module(TARGET.module)
    return overlay_applied


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("tokens", [1, 7])
def test_rewritten_forward_matches_upstream(overlay_applied, minicpm3_vllm, count_forks, tokens, dtype):
    assert rewrite.applied_features(TARGET) == ["kv_a_proj"]
    upstream, rewritten = functions(TARGET)
    layer, hf = _layer(minicpm3_vllm, dtype)
    positions, hidden = _inputs(hf, tokens, dtype)
    with torch.no_grad():
        expected = upstream(layer, positions, hidden)
        assert count_forks == [] and layer.attn.calls == 1
        actual = rewritten(layer, positions, hidden)
    assert layer.attn.calls == 2
    assert count_forks == [("kv_a_proj_minicpm3", tokens)]
    assert actual.shape == (tokens, hf.hidden_size) and actual.dtype == dtype
    assert torch.equal(actual, expected)


def test_the_comparison_fails_when_the_kv_latent_changes(overlay_applied, minicpm3_vllm, monkeypatch):
    """A perturbed aux branch (kv_a_proj_with_mqa's output) changes the layer's output."""
    from conftest import wrap_branch

    upstream, rewritten = functions(TARGET)
    layer, hf = _layer(minicpm3_vllm)
    positions, hidden = _inputs(hf, 7)
    with torch.no_grad():
        expected = upstream(layer, positions, hidden)
        wrap_branch(monkeypatch, "kv_a_proj_minicpm3", "aux", lambda t: t * 1.01 + 0.01)
        assert not torch.equal(rewritten(layer, positions, hidden), expected)


@pytest.mark.parametrize("tokens", [1, 7])
def test_compiled_forward_is_one_op_and_matches_upstream_eager(overlay_applied, minicpm3_vllm, tokens):
    """Under torch.compile the site is one opaque op call and the result is upstream's."""
    upstream, rewritten = functions(TARGET)
    layer, hf = _layer(minicpm3_vllm)
    positions, hidden = _inputs(hf, tokens)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(lambda p, h: rewritten(layer, p, h), backend=backend, fullgraph=True)
    with torch.no_grad():
        expected = upstream(layer, positions, hidden)
        actual = compiled(positions, hidden)
    ops = [
        n for gm in graphs for n in gm.graph.nodes
        if n.op == "call_function" and "vllm_overlap" in str(n.target)
    ]
    assert [str(n.target) for n in ops] == ["vllm_overlap.kv_a_proj_minicpm3"]
    assert torch.equal(actual, expected)
