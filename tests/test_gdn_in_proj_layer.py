"""Layer-level differential tests of gdn_in_proj on the real vLLM GDN layer.

For each rewritten forward variant: the same layer and inputs through the upstream function
and through the rewritten one, with the same plain-torch stand-ins for the kernels that
cannot run on the CPU: outputs must be bit-identical, every stand-in must have run in both,
and only the rewritten forward may have gone through the overlay's stream primitive.
"""

from __future__ import annotations

import pytest
import torch
from conftest import site_entry

from vllm_overlap.engine import rewrite
from vllm_overlap.sites.gdn_in_proj import CLASS, MODULE, VARIANTS

EXPECTED_STANDIN = {
    "forward_cuda": "qwen_gdn_attention_core",
    "forward_hip": "qwen_gdn_attention_core(aiter)",
    "forward_xpu": "gdn_attention_core_xpu",
    "forward_cpu": "cpu_gdn_attention_core",
}




@pytest.mark.parametrize("num_tokens", [1, 7])
@pytest.mark.parametrize("interleaved", [True, False], ids=["qwen3-next", "qwen3.5"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_rewritten_forward_matches_upstream(
    variant, interleaved, num_tokens, gdn_layer, kernel_standins, count_forks, monkeypatch
):
    import importlib

    module = importlib.import_module(MODULE)
    if variant == "forward_hip":
        # The ROCm branch only runs where AITER's Triton GDN kernels exist.
        monkeypatch.setattr(module, "GDN_AITER_TRITON_AVAILABLE", True)
    cls = getattr(module, CLASS)
    target = rewrite.Target(MODULE, f"{CLASS}.{variant}")
    assert rewrite.applied_features(target) == ["gdn_in_proj"]
    upstream = rewrite.original_function(target)
    rewritten = getattr(cls, variant)
    assert rewritten is not upstream

    layer = gdn_layer(interleaved=interleaved)
    hidden = torch.randn(num_tokens, layer.hidden_size, generator=torch.Generator().manual_seed(1))
    hidden = hidden.to(torch.bfloat16)

    expected = upstream(layer, hidden)
    upstream_calls = dict(kernel_standins.calls)
    assert count_forks == []
    kernel_standins.calls.clear()
    actual = rewritten(layer, hidden)

    stand_in = EXPECTED_STANDIN[variant]
    assert upstream_calls.get(stand_in) == 1, upstream_calls
    assert kernel_standins.calls.get(stand_in) == 1, kernel_standins.calls
    assert count_forks == [("gdn_in_proj", num_tokens)]
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert torch.equal(actual, expected)


def test_projection_outputs_are_those_of_the_two_linears(gdn_layer):
    """The op's outputs are exactly in_proj_qkvz(h) and in_proj_ba(h), contiguous."""
    layer = gdn_layer()
    hidden = torch.randn(5, layer.hidden_size, dtype=torch.bfloat16)
    qkvz, ba = site_entry("gdn_in_proj")(layer, hidden)
    assert torch.equal(qkvz, layer.in_proj_qkvz(hidden)[0])
    assert torch.equal(ba, layer.in_proj_ba(hidden)[0])
    assert qkvz.is_contiguous() and ba.is_contiguous()


def test_without_a_second_stream_the_rewritten_code_is_the_upstream_statements(
    gdn_layer, kernel_standins, count_forks, monkeypatch
):
    """The CPU default (no VLLM_OVERLAP_TEST_OP_PATH): nothing to overlap, nothing paid."""
    import importlib

    from vllm_overlap.runtime import gates

    monkeypatch.setattr(gates, "_OVERLAP_POSSIBLE", False)
    module = importlib.import_module(MODULE)
    target = rewrite.Target(MODULE, f"{CLASS}.forward_cpu")
    layer = gdn_layer()
    hidden = torch.randn(4, layer.hidden_size, dtype=torch.bfloat16)
    expected = rewrite.original_function(target)(layer, hidden)
    actual = getattr(module, CLASS).forward_cpu(layer, hidden)
    assert count_forks == [] and torch.equal(actual, expected)
