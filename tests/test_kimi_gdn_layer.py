"""Layer-level differential test of delta_in_proj's Kimi GDN site on the real vLLM
``KimiGatedDeltaNetAttention`` (Kimi-Linear, AliceAI).

The same tiny layer (seeded weights) and inputs go through upstream's forward and the rewritten
one. Its delta-attention core (``_forward``: conv, gate kernel and recurrence, Triton-only and
reading the engine's metadata) is a counted plain-torch stand-in whose output depends on every
element of mixed_qkv, g1, g2 and beta: the split, the f_b_proj GEMM, the rearranges and the
output projection around the site are vLLM's, compared bit for bit. Full-rank-gate layers keep
upstream's statements, and the census says why.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import functions, wrap_branch

from vllm_overlap.engine import rewrite
from vllm_overlap.sites.delta_in_proj import KIMI_GDN

TARGET = KIMI_GDN.targets[0]
SITE = KIMI_GDN.id


class CoreStandin:
    """``_forward(mixed_qkv, g1, g2, beta, core_attn_out)``: writes a mix of all four."""

    def __init__(self):
        self.calls = 0

    def __call__(self, mixed_qkv, g1, g2, beta, core_attn_out):
        self.calls += 1
        q, k, v = mixed_qkv.float().chunk(3, dim=-1)
        mixed = (q + k.roll(1, -1) * 0.5 + v.flip(-1) * 0.25).view(core_attn_out.shape)
        mixed = mixed * g1.float().sigmoid() * beta.float().unsqueeze(-1) + g2.float().unsqueeze(0) * 0.125
        core_attn_out.copy_(mixed.to(core_attn_out.dtype))


@pytest.fixture
def overlay_applied(overlay_applied):
    """The plugin registered and the Kimi GDN module imported (so rewritten)."""
    importlib.import_module(TARGET.module)
    return overlay_applied


def _layer(vllm_context, dtype=torch.bfloat16, full_rank_gate=False):
    from vllm_overlap.testing.layer_builders import build_kimi_gdn_layer
    from vllm_overlap.testing.tiny_models import kimi_linear_config

    hf = kimi_linear_config(full_rank_gate)
    layer = build_kimi_gdn_layer(vllm_context, hf, dtype=dtype, seed=4)
    assert layer.use_full_rank_gate == full_rank_gate
    layer._forward = CoreStandin()
    return layer, hf


def _run(fn, layer, hf, tokens, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(tokens)
    hidden = torch.randn(tokens, hf.hidden_size, generator=gen).to(dtype)
    with torch.no_grad():
        return fn(layer, hidden, torch.arange(tokens))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("tokens", [1, 7])
def test_rewritten_forward_matches_upstream(overlay_applied, vllm_context, count_forks, tokens, dtype):
    assert rewrite.applied_features(TARGET) == ["delta_in_proj"]
    upstream, rewritten = functions(TARGET)
    layer, hf = _layer(vllm_context, dtype)
    expected = _run(upstream, layer, hf, tokens, dtype)
    assert count_forks == [] and layer._forward.calls == 1
    actual = _run(rewritten, layer, hf, tokens, dtype)
    assert layer._forward.calls == 2
    assert count_forks == [(SITE, tokens)]
    assert actual.shape == (tokens, hf.hidden_size) and actual.dtype == dtype
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("which", ["current", "aux"])
def test_the_comparison_fails_when_either_branch_changes(overlay_applied, vllm_context, monkeypatch, which):
    upstream, rewritten = functions(TARGET)
    layer, hf = _layer(vllm_context)
    expected = _run(upstream, layer, hf, 7)
    wrap_branch(monkeypatch, SITE, which, lambda t: t * 1.01 + 0.01)
    assert not torch.equal(_run(rewritten, layer, hf, 7), expected)


def test_a_full_rank_gate_layer_runs_upstreams_statements(overlay_applied, vllm_context, count_forks, monkeypatch):
    """The gate inside the fused projection: the rewritten forward is upstream's, unforked, and
    the census counts the layer as not reaching the site."""
    from vllm_overlap.runtime import census as site_census
    from vllm_overlap.runtime import reports as census

    upstream, rewritten = functions(TARGET)
    full, hf = _layer(vllm_context, full_rank_gate=True)
    assert torch.equal(_run(rewritten, full, hf, 7), _run(upstream, full, hf, 7))
    assert count_forks == [] and full._forward.calls == 2
    monkeypatch.setattr(census, "site_reports", {})
    low_rank, _ = _layer(vllm_context)
    rows = site_census.post_load(torch.nn.ModuleList([low_rank, full]))
    assert rows[SITE]["overlap"] == 1
    assert rows[SITE]["serial"] == {"not reached: upstream's forward takes another path here (the site needs not self.use_full_rank_gate)": 1}
