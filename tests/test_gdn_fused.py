"""gdn_in_proj mode fused: one GEMM over concatenated weights, made once after loading."""

from __future__ import annotations

import pytest
import torch

from vllm_overlap import streams
from vllm_overlap.ops import gdn_fuse
from vllm_overlap.ops import gdn_in_proj as ops


def _process(module):
    module.quant_method.process_weights_after_loading(module)


@pytest.fixture
def fused_twin(gdn_layer, vllm_context):
    """(unfused layer, fused layer) with the same weights, both post-processed like vLLM."""

    def make(interleaved=True):
        from vllm.config import set_current_vllm_config

        plain = gdn_layer(interleaved=interleaved, seed=3)
        fused = gdn_layer(interleaved=interleaved, seed=3)
        with set_current_vllm_config(vllm_context):
            before, after = gdn_fuse.fuse_layer(fused)
        _process(getattr(fused, gdn_fuse.FUSED))
        return plain, fused, before, after

    return make


@pytest.mark.parametrize("num_tokens", [1, 7, 256])
@pytest.mark.parametrize("interleaved", [True, False], ids=["qwen3-next", "qwen3.5"])
def test_fused_projection_equals_the_two_projections(fused_twin, num_tokens, interleaved):
    plain, fused, before, after = fused_twin(interleaved)
    hidden = torch.randn(num_tokens, plain.hidden_size, dtype=torch.bfloat16)
    qkvz, ba = ops.fused_in_proj(fused, hidden)
    assert torch.equal(qkvz, plain.in_proj_qkvz(hidden)[0])
    assert torch.equal(ba, plain.in_proj_ba(hidden)[0])
    assert qkvz.is_contiguous() and ba.is_contiguous()


def test_fusing_keeps_no_extra_parameter_memory(fused_twin):
    plain, fused, before, after = fused_twin()
    assert before == after > 0
    bytes_of = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731
    assert bytes_of(fused) == bytes_of(plain)
    assert not hasattr(fused, "in_proj_qkvz") and not hasattr(fused, "in_proj_ba")


@pytest.mark.parametrize(
    "spoil, reason",
    [
        (lambda l: setattr(l.in_proj_ba, "base_layer", torch.nn.Identity()), "in_proj_ba is LoRA-wrapped"),
        (lambda l: setattr(l.in_proj_qkvz, "quant_method", object()), "in_proj_qkvz is quantised (object)"),
        (lambda l: setattr(l.in_proj_ba, "tp_size", 2), "sharded differently"),
        (lambda l: l.in_proj_ba.to(torch.float32), "dtypes differ"),
    ],
    ids=["lora", "quantised", "sharding", "dtype"],
)
def test_ineligible_layers_say_why(gdn_layer, spoil, reason):
    layer = gdn_layer()
    assert gdn_fuse.why_not_fusable(layer) is None
    spoil(layer)
    assert reason in gdn_fuse.why_not_fusable(layer)


@pytest.mark.parametrize("fallback, forks", [("serial", 0), ("dual_stream", 1)])
def test_unfused_layer_runs_the_configured_fallback(gdn_layer, monkeypatch, fallback, forks):
    from vllm_overlap import state
    from vllm_overlap.config import parse_config

    cfg = parse_config(f"features: {{gdn_in_proj: {{mode: fused, fused_fallback: {fallback}}}}}", "x")
    monkeypatch.setattr(state, "feature_config", lambda name: cfg.feature(name))
    calls = []
    real = streams.run_pair
    monkeypatch.setattr(streams, "run_pair", lambda *a: calls.append(a[0]) or real(*a))
    layer = gdn_layer()
    hidden = torch.randn(3, layer.hidden_size, dtype=torch.bfloat16)
    qkvz, ba = ops.fused_in_proj(layer, hidden)
    assert len(calls) == forks
    assert torch.equal(qkvz, layer.in_proj_qkvz(hidden)[0]) and torch.equal(ba, layer.in_proj_ba(hidden)[0])
