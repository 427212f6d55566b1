"""Layer-level differential test of kv_a_proj's Kimi-Linear site on the real vLLM Kimi
``MultiHeadLatentAttention`` (full-rank q path, ``_forward_full_rank_q``).

The same tiny layer (seeded weights) and inputs go through upstream's ``forward`` and the
rewritten one. Its attention kernel (``_attention``, which needs the engine's metadata) is a
counted plain-torch stand-in whose output depends on every element of q, the normed kv latent
and k_pe: the head view, the kv split, ``kv_a_layernorm`` and the output projection around the
site are vLLM's, compared bit for bit. A layer with a q low-rank path never reaches the site.
The layer's own post-load step (W_UK / W_UV for that kernel) is not run: see
``site_layers.process_weights_like_the_loader``.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import functions, wrap_branch

from vllm_overlap.engine import rewrite
from vllm_overlap.sites.kv_a_proj import KIMI_LINEAR

TARGET = KIMI_LINEAR.targets[0]
SITE = KIMI_LINEAR.id


class AttentionStandin:
    """``_attention(positions, q, kv_c_normed, k_pe, out)``: writes a mix of all three."""

    def __init__(self):
        self.calls = 0

    def __call__(self, positions, q, kv_c_normed, k_pe, out):
        self.calls += 1
        tokens, width = out.shape
        mixed = q.float().reshape(tokens, -1, width).sum(1)
        mixed = mixed + kv_c_normed.float().repeat(1, width // kv_c_normed.shape[-1]) * 0.5
        mixed = mixed + k_pe.float().flatten(1).repeat(1, width // k_pe.shape[-1]) * 0.25
        out.copy_(mixed.to(out.dtype))


@pytest.fixture
def overlay_applied(overlay_applied):
    """The plugin registered and Kimi's MLA module imported (so rewritten)."""
    importlib.import_module(TARGET.module)
    return overlay_applied


def _layer(vllm_context, dtype=torch.bfloat16):
    from vllm_overlap.testing.layer_builders import build_kimi_mla_layer
    from vllm_overlap.testing.tiny_models import kimi_linear_config

    hf = kimi_linear_config()
    layer = build_kimi_mla_layer(vllm_context, hf, dtype=dtype, seed=6)
    assert layer.q_lora_rank is None
    layer._attention = AttentionStandin()
    return layer, hf


def _run(layer, hf, tokens, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(tokens)
    hidden = torch.randn(tokens, hf.hidden_size, generator=gen).to(dtype)
    with torch.no_grad():
        return layer.forward(torch.arange(tokens), hidden)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("tokens", [1, 7])
def test_rewritten_forward_matches_upstream(overlay_applied, vllm_context, count_forks, monkeypatch, tokens, dtype):
    assert rewrite.applied_features(TARGET) == ["kv_a_proj"]
    upstream, rewritten = functions(TARGET)
    layer, hf = _layer(vllm_context, dtype)
    owner = type(layer)
    with monkeypatch.context() as m:
        m.setattr(owner, "_forward_full_rank_q", upstream)
        expected = _run(layer, hf, tokens, dtype)
    assert count_forks == [] and layer._attention.calls == 1
    assert owner._forward_full_rank_q is rewritten
    actual = _run(layer, hf, tokens, dtype)
    assert layer._attention.calls == 2
    assert count_forks == [(SITE, tokens)]
    assert actual.shape == (tokens, hf.hidden_size) and actual.dtype == dtype
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("which", ["current", "aux"])
def test_the_comparison_fails_when_either_branch_changes(overlay_applied, vllm_context, monkeypatch, which):
    upstream, _ = functions(TARGET)
    layer, hf = _layer(vllm_context)
    with monkeypatch.context() as m:
        m.setattr(type(layer), "_forward_full_rank_q", upstream)
        expected = _run(layer, hf, 7)
    wrap_branch(monkeypatch, SITE, which, lambda t: t * 1.01 + 0.01)
    assert not torch.equal(_run(layer, hf, 7), expected)
