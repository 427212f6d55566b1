"""The DeepSeek layers run on this CPU through their stand-ins: every layer variant, twice for
1 and 7 tokens, gives bit-identical, finite outputs of the right length, and calls every
stand-in its forward reaches. And the generic stand-in wrapper (``kernel_standin``) calls
like the real kernel."""

from __future__ import annotations

from collections import Counter

import deepseek_layers as dl
import pytest
import torch
from kernel_standin import standin


def _indexer(vllm_config, standins, monkeypatch, branch: str):
    from vllm.model_executor.models.deepseek_v2 import Indexer

    hf = dl.deepseek_v32_config()
    indexer = dl.build_indexer(vllm_config, hf, standins=standins, seed=1)
    rope = standins.select_indexer_branch(monkeypatch, indexer, branch, dl.build_indexer_rope(hf))
    quant = "fused_indexer_q_rope_quant" if branch == "fused_q" else "per_token_group_quant_fp8"
    expected = {"indexer_op", quant} | ({"rope_inplace"} if branch == "rocm_inplace" else set())

    def run(tokens):
        positions, _, qr = dl.make_inputs(hf, tokens)
        hidden = dl.make_inputs(hf, tokens, seed=1)[1]
        return dl.run_indexer(Indexer.forward, indexer, hidden, qr, positions, rope)

    return run, expected


def _wrapper(vllm_config, standins, monkeypatch, with_indexer: bool):
    from vllm.model_executor.layers.mla import MultiHeadLatentAttentionWrapper

    config = dl.deepseek_v32_config() if with_indexer else dl.deepseek_v3_config()
    wrapper = dl.build_mla_wrapper(vllm_config, config, with_indexer, standins=standins)
    expected = {"mla_attn"}
    if with_indexer:
        expected |= {"indexer_op", "per_token_group_quant_fp8", "impl.record_logical_topk_ready"}

    def run(tokens):
        positions, hidden, _ = dl.make_inputs(config, tokens)
        return dl.run_mla_wrapper(MultiHeadLatentAttentionWrapper.forward, wrapper, positions, hidden)

    return run, expected


def _v32(vllm_config, standins, monkeypatch, variant: str):
    from vllm.models.deepseek_v32.attention import DeepseekV32Attention

    hf = dl.deepseek_v32_config()
    layer = dl.build_v32_attention(vllm_config, hf, variant != "no_indexer", standins=standins)
    layer.skip_topk = variant == "skip_topk"
    expected = {
        "fused_norm_rope",
        "fused_q",
        "sparse_indexer_and_attn",
        "impl.prepare_for_batch",
        "impl.record_logical_topk_ready",
    }

    def run(tokens):
        positions, hidden, _ = dl.make_inputs(hf, tokens)
        return dl.run_v32(DeepseekV32Attention.forward, layer, positions, hidden)

    return run, expected


CASES = (
    [(f"Indexer[{b}]", _indexer, b) for b in dl.INDEXER_BRANCHES]
    + [(f"MLAWrapper[indexer={w}]", _wrapper, w) for w in (False, True)]
    + [(f"DeepseekV32Attention[{v}]", _v32, v) for v in ("indexer", "no_indexer", "skip_topk")]
)


@pytest.mark.parametrize("name, case, arg", CASES, ids=[c[0] for c in CASES])
def test_layer_runs_deterministically_through_its_standins(
    deepseek_vllm, standins, monkeypatch, name, case, arg
):
    run, expected = case(deepseek_vllm, standins, monkeypatch, arg)
    before = Counter(standins.calls)
    for tokens in (1, 7):
        first, second = run(tokens), run(tokens)
        assert dl.identical(first, second), f"two runs differ at {tokens} tokens"
        for t in first:
            assert t.shape[0] == tokens
            assert torch.isfinite(t.float()).all()
    used = standins.calls - before
    assert expected <= set(used), f"stand-ins not called: {sorted(expected - set(used))}"


# ---- the generic wrapper --------------------------------------------------------------------


def _kernel(x, scale, out=None, *, flag=False):
    raise AssertionError("the real kernel must not run")


def test_standin_takes_the_real_signature_and_passes_every_argument_by_name():
    seen = []
    calls = Counter()
    fake = standin(_kernel, lambda **a: seen.append(a) or "done", calls, "kernel")
    assert fake(1, 2) == "done" and fake(1, scale=3, out=4, flag=True) == "done"
    assert seen == [
        {"x": 1, "scale": 2, "out": None, "flag": False},  # the real defaults
        {"x": 1, "scale": 3, "out": 4, "flag": True},
    ]
    assert calls == Counter({"kernel": 2})
    with pytest.raises(TypeError):
        fake(1)  # scale missing: the real kernel would refuse it
    with pytest.raises(TypeError):
        fake(1, 2, unknown=0)
    with pytest.raises(TypeError):
        fake(1, 2, 3, True)  # flag is keyword-only in the real kernel
    assert calls == Counter({"kernel": 2})


def test_standin_refuses_a_body_reading_an_argument_the_kernel_does_not_take():
    with pytest.raises(TypeError, match=r"reads \['bias'\]"):
        standin(_kernel, lambda *, x, bias, **_: None, Counter(), "kernel")


def test_standin_refuses_a_variadic_kernel():
    with pytest.raises(TypeError, match="by hand"):
        standin(lambda *args: None, lambda **a: None, Counter(), "kernel")


def test_standin_follows_bound_methods_and_traces_in_one_graph():
    class Layer(torch.nn.Module):
        def attend(self, q, k, output):
            raise AssertionError("real")

    layer = Layer()
    calls = Counter()

    def attend(*, output, **tensors):
        output.copy_(sum(tensors.values()))

    layer.attend = standin(layer.attend, attend, calls, "attend")  # bound: no self

    def forward(q, k):
        out = torch.empty_like(q)
        layer.attend(q, k, out)
        return out

    q, k = torch.ones(3), torch.full((3,), 2.0)
    compiled = torch.compile(forward, backend="eager", fullgraph=True)
    assert torch.equal(compiled(q, k), torch.full((3,), 3.0))
