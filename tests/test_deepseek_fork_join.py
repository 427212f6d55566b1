"""Fork/join structure of every region the DeepSeek features rewrite, without a GPU.

With ``fork_join_recorder.Recorder`` as the stream primitive, the layers' submodules and the
stand-ins log each call with the branch it ran on, so each test asserts the exact sequence:
which statements went to which stream, and that every consumer of a region's outputs runs
after its join; and the recorder's storage check finds no cross-branch hazard.
"""

from __future__ import annotations

import types

import pytest
import torch
from conftest import functions
from deepseek_layers import (
    INDEXER_BRANCHES,
    INDEXER_TARGET,
    ROCM_TARGET,
    V32_TARGET,
    WRAPPER_TARGET,
    build_indexer,
    build_indexer_rope,
    build_mla_wrapper,
    build_v32_attention,
    deepseek_v3_config,
    deepseek_v32_config,
    make_inputs,
    run_indexer,
    run_mla_wrapper,
    run_v32,
)
from fork_join_recorder import b0, b1, fork, join, out, without_forks

from vllm_overlap.runtime import streams

# The sites, by code shape: V3.2 CUDA path and the legacy (compiled / MLA wrapper) path.
DI, MQ = "deepseek_indexer_v32", "mla_q_b_proj_v32"
LDI, LMQ = "deepseek_indexer_legacy", "mla_q_b_proj_legacy"


# --------------------------------------------------------------------------------------------
# DeepseekV32Attention: deepseek_indexer's a_proj, then mla_q_b_proj's q paths
# --------------------------------------------------------------------------------------------


def _v32_layer(vllm_config, standins, recorder, monkeypatch, variant, prepare_mqa_query):
    import vllm.models.deepseek_v32.attention as v32

    layer = build_v32_attention(
        vllm_config, deepseek_v32_config(), variant != "no_indexer", standins=standins
    )
    layer.skip_topk = variant == "skip_topk"
    monkeypatch.setattr(layer, "_should_prepare_mqa_query", lambda *args: prepare_mqa_query)
    for name in ("fused_qkv_a_proj", "q_b_proj", "o_proj"):
        recorder.wrap_module(getattr(layer, name), name)
    if layer.indexer is not None:
        recorder.wrap_module(layer.indexer.wk_weights_proj, "indexer.wk_weights_proj")
        recorder.wrap_module(layer.indexer.wq_b, "indexer.wq_b")
        recorder.wrap_module(layer.indexer.k_norm, "indexer.k_norm")
    for name in ("fused_norm_rope", "fused_q"):
        recorder.wrap(v32, name, name)
    recorder.wrap(layer, "_sparse_indexer_and_attn", "sparse_indexer_and_attn")
    recorder.wrap(torch, "bmm", "W_UK_T bmm")
    return layer


@pytest.mark.parametrize("prepare_mqa_query", [True, False], ids=["mqa_q", "no_mqa_q"])
@pytest.mark.parametrize("tokens", [1, 7])
def test_v32_with_indexer_forks_both_regions(
    deepseek_vllm, standins, recorder, monkeypatch, tokens, prepare_mqa_query
):
    upstream, rewritten = functions(V32_TARGET)
    layer = _v32_layer(
        deepseek_vllm, standins, recorder, monkeypatch, "indexer", prepare_mqa_query
    )
    positions, hidden, _ = make_inputs(deepseek_v32_config(), tokens)
    bmm = ["W_UK_T bmm"] if prepare_mqa_query else []

    recorder.run(lambda: run_v32(upstream, layer, positions, hidden))
    assert recorder.log == out(
        "fused_qkv_a_proj",
        "indexer.wk_weights_proj",
        "fused_norm_rope",
        "q_b_proj",
        *bmm,
        "indexer.wq_b",
        "fused_q",
        "sparse_indexer_and_attn",
        "o_proj",
    )
    upstream_calls = without_forks(recorder.log)

    recorder.run(lambda: run_v32(rewritten, layer, positions, hidden))
    assert recorder.log == [
        fork(DI),
        b0(DI, "fused_qkv_a_proj"),
        b1(DI, "indexer.wk_weights_proj"),
        join(DI),
        *out("fused_norm_rope"),  # reads qkv_lora's split and kw's index_k: after the join
        fork(MQ),
        b0(MQ, "indexer.wq_b"),
        b1(MQ, "q_b_proj"),
        *[b1(MQ, name) for name in bmm],
        join(MQ),
        *out("fused_q", "sparse_indexer_and_attn", "o_proj"),  # q_pe, ql_nope, index_q
    ]
    assert sorted(without_forks(recorder.log)) == sorted(upstream_calls)
    recorder.assert_no_cross_branch_hazard()


@pytest.mark.parametrize("variant", ["no_indexer", "skip_topk"])
def test_v32_without_active_indexer_does_not_fork(
    deepseek_vllm, standins, recorder, monkeypatch, variant
):
    upstream, rewritten = functions(V32_TARGET)
    layer = _v32_layer(deepseek_vllm, standins, recorder, monkeypatch, variant, True)
    positions, hidden, _ = make_inputs(deepseek_v32_config(), 7)
    expected = out(
        "fused_qkv_a_proj",
        "fused_norm_rope",
        "q_b_proj",
        "W_UK_T bmm",
        "fused_q",
        "sparse_indexer_and_attn",
        "o_proj",
    )
    recorder.run(lambda: run_v32(upstream, layer, positions, hidden))
    assert recorder.log == expected
    recorder.run(lambda: run_v32(rewritten, layer, positions, hidden))
    assert recorder.log == expected and recorder.forks == []


def test_rocm_forward_forks_a_proj(deepseek_vllm, standins, recorder, monkeypatch):
    """The ROCm subclass's rewritten forward, unbound on a CPU-built V3.2 layer."""
    upstream, rewritten = functions(ROCM_TARGET)
    layer = _v32_layer(deepseek_vllm, standins, recorder, monkeypatch, "indexer", True)
    monkeypatch.setattr(layer, "_fused_attention", lambda *args: None, raising=False)
    recorder.wrap(layer, "_fused_attention", "_fused_attention")
    positions, hidden, _ = make_inputs(deepseek_v32_config(), 7)
    recorder.run(lambda: run_v32(upstream, layer, positions, hidden))
    assert recorder.log == out(
        "fused_qkv_a_proj", "indexer.wk_weights_proj", "_fused_attention", "o_proj"
    )
    recorder.run(lambda: run_v32(rewritten, layer, positions, hidden))
    assert recorder.log == [
        fork(DI),
        b0(DI, "fused_qkv_a_proj"),
        b1(DI, "indexer.wk_weights_proj"),
        join(DI),
        *out("_fused_attention", "o_proj"),
    ]
    recorder.assert_no_cross_branch_hazard()


# --------------------------------------------------------------------------------------------
# Legacy Indexer: q_and_k
# --------------------------------------------------------------------------------------------


def _wrap_indexer(recorder, indexer, prefix=""):
    recorder.wrap_module(indexer.wq_b, f"{prefix}wq_b")
    recorder.wrap_module(indexer.wk_weights_proj, f"{prefix}wk_weights_proj")
    recorder.wrap_module(indexer.k_norm, f"{prefix}k_norm")
    recorder.wrap_module(indexer.indexer_op, f"{prefix}indexer_op")


def _wrap_indexer_globals(recorder):
    import vllm.model_executor.models.deepseek_v2 as deepseek_v2

    for name in ("per_token_group_quant_fp8", "fused_indexer_q_rope_quant"):
        recorder.wrap(deepseek_v2, name, name)


# after the join, per branch of Indexer.forward: what consumes q, kw's weights and k
INDEXER_CONSUMERS = {
    "rocm_inplace": ["rotary_emb", "per_token_group_quant_fp8", "indexer_op"],
    "fused_q": ["fused_indexer_q_rope_quant", "rotary_emb", "indexer_op"],
    "default": ["rotary_emb", "per_token_group_quant_fp8", "indexer_op"],
}


@pytest.mark.parametrize("tokens", [1, 7])
@pytest.mark.parametrize("branch", INDEXER_BRANCHES)
def test_indexer_forks_q_beside_k(deepseek_vllm, standins, recorder, monkeypatch, branch, tokens):
    hf = deepseek_v32_config()
    upstream, rewritten = functions(INDEXER_TARGET)
    indexer = build_indexer(deepseek_vllm, hf, standins=standins, seed=1)
    rope = standins.select_indexer_branch(monkeypatch, indexer, branch, build_indexer_rope(hf))
    _wrap_indexer(recorder, indexer)
    _wrap_indexer_globals(recorder)
    recorder.wrap_module(rope, "rotary_emb")
    positions, _, qr = make_inputs(hf, tokens)
    hidden = make_inputs(hf, tokens, seed=1)[1]
    consumers = INDEXER_CONSUMERS[branch]

    recorder.run(lambda: run_indexer(upstream, indexer, hidden, qr, positions, rope))
    assert recorder.log == out("wq_b", "wk_weights_proj", "k_norm", *consumers)

    recorder.run(lambda: run_indexer(rewritten, indexer, hidden, qr, positions, rope))
    assert recorder.log == [
        fork(LDI),
        b0(LDI, "wq_b"),
        b1(LDI, "wk_weights_proj"),
        b1(LDI, "k_norm"),
        join(LDI),
        *out(*consumers),
    ]
    recorder.assert_no_cross_branch_hazard()


def test_indexer_rocm_inplace_rope_mutates_only_after_the_join(
    deepseek_vllm, standins, recorder, monkeypatch
):
    """The ROCm branch rotates q and k in place: both are op outputs, touched outside."""
    hf = deepseek_v32_config()
    _, rewritten = functions(INDEXER_TARGET)
    indexer = build_indexer(deepseek_vllm, hf, standins=standins, seed=1)
    rope = standins.select_indexer_branch(
        monkeypatch, indexer, "rocm_inplace", build_indexer_rope(hf)
    )
    region_outputs = []

    def keep_outputs(site, fn0, fn1, num_tokens, feature):
        result = recorder.run_pair(site, fn0, fn1, num_tokens, feature)
        region_outputs.append(result)
        return result

    monkeypatch.setattr(streams, "run_pair", keep_outputs)
    positions, _, qr = make_inputs(hf, 5)
    hidden = make_inputs(hf, 5, seed=1)[1]
    recorder.run(lambda: run_indexer(rewritten, indexer, hidden, qr, positions, rope))
    assert recorder.forks == [LDI]
    (q, (kw, k)), = region_outputs
    assert q._version > 0 and k._version > 0  # rotated in place after the join
    assert kw._version == 0


# --------------------------------------------------------------------------------------------
# Legacy MLA wrapper: q projection + RoPE beside the whole indexer call
# --------------------------------------------------------------------------------------------


def _wrap_wrapper(recorder, wrapper):
    for name in ("fused_qkv_a_proj", "q_b_proj", "rotary_emb", "o_proj", "kv_a_layernorm"):
        recorder.wrap_module(getattr(wrapper, name), name)
    if not wrapper.fuse_qkv_rmsnorm:
        recorder.wrap_module(wrapper.q_a_layernorm, "q_a_layernorm")
    recorder.wrap(wrapper.mla_attn, "forward", "mla_attn")
    recorder.wrap(wrapper.mla_attn.impl, "record_logical_topk_ready", "record_logical_topk_ready")


@pytest.mark.parametrize("tokens", [1, 7])
@pytest.mark.parametrize("indexer_forward", ["upstream", "rewritten"])
def test_mla_wrapper_forks_q_path_beside_the_indexer(
    deepseek_vllm, standins, recorder, monkeypatch, tokens, indexer_forward
):
    hf = deepseek_v32_config()
    upstream, rewritten = functions(WRAPPER_TARGET)
    indexer_upstream, _ = functions(INDEXER_TARGET)
    wrapper = build_mla_wrapper(deepseek_vllm, hf, True, standins=standins)
    assert not wrapper.fuse_qkv_rmsnorm
    _wrap_wrapper(recorder, wrapper)
    indexer = wrapper.indexer
    _wrap_indexer(recorder, indexer, "indexer.")
    _wrap_indexer_globals(recorder)
    recorder.wrap_module(wrapper.indexer_rope_emb, "indexer.rotary_emb")
    positions, hidden, _ = make_inputs(hf, tokens)
    head = out("fused_qkv_a_proj", "q_a_layernorm", "kv_a_layernorm")
    tail = out("record_logical_topk_ready", "mla_attn", "o_proj")
    indexer_tail = ["indexer.rotary_emb", "per_token_group_quant_fp8", "indexer.indexer_op"]

    with monkeypatch.context() as m:
        m.setattr(indexer, "forward", types.MethodType(indexer_upstream, indexer))
        recorder.wrap_module(indexer, "indexer")  # (the call of the indexer module itself)
        recorder.run(lambda: run_mla_wrapper(upstream, wrapper, positions, hidden))
    assert recorder.log == [
        *head,
        *out("q_b_proj", "rotary_emb", "indexer"),
        *out("indexer.wq_b", "indexer.wk_weights_proj", "indexer.k_norm", *indexer_tail),
        *tail,
    ]

    with monkeypatch.context() as m:
        if indexer_forward == "upstream":
            m.setattr(indexer, "forward", types.MethodType(indexer_upstream, indexer))
        recorder.wrap_module(indexer, "indexer")
        recorder.run(lambda: run_mla_wrapper(rewritten, wrapper, positions, hidden))
    if indexer_forward == "upstream":
        indexer_calls = [
            b0(LMQ, name)
            for name in (
                "indexer.wq_b",
                "indexer.wk_weights_proj",
                "indexer.k_norm",
                *indexer_tail,
            )
        ]
    else:  # the rewritten indexer forks again, inside branch 0
        indexer_calls = [
            fork(LDI),
            b0(LDI, "indexer.wq_b"),
            b1(LDI, "indexer.wk_weights_proj"),
            b1(LDI, "indexer.k_norm"),
            join(LDI),
            *[b0(LMQ, name) for name in indexer_tail],
        ]
    assert recorder.log == [
        *head,
        fork(LMQ),
        b0(LMQ, "indexer"),
        *indexer_calls,
        b1(LMQ, "q_b_proj"),
        b1(LMQ, "rotary_emb"),
        join(LMQ),
        *tail,  # the top-k the indexer wrote, q and k_pe: read after the join
    ]
    recorder.assert_no_cross_branch_hazard()


def test_mla_wrapper_without_indexer_does_not_fork(deepseek_vllm, standins, recorder):
    hf = deepseek_v3_config()
    upstream, rewritten = functions(WRAPPER_TARGET)
    wrapper = build_mla_wrapper(deepseek_vllm, hf, False, standins=standins)
    _wrap_wrapper(recorder, wrapper)
    positions, hidden, _ = make_inputs(hf, 7)
    expected = out(
        "fused_qkv_a_proj", "q_a_layernorm", "kv_a_layernorm", "q_b_proj", "rotary_emb",
        "mla_attn", "o_proj",
    )
    recorder.run(lambda: run_mla_wrapper(upstream, wrapper, positions, hidden))
    assert recorder.log == expected
    recorder.run(lambda: run_mla_wrapper(rewritten, wrapper, positions, hidden))
    assert recorder.log == expected and recorder.forks == []




def test_hazard_check_catches_a_mutation_inside_a_real_region(
    deepseek_vllm, standins, recorder, monkeypatch
):
    """Branch 1 of V3.2's a_proj touching hidden_states in place (a numerical no-op) is
    what the check exists for: branch 0 reads it for fused_qkv_a_proj."""
    _, rewritten = functions(V32_TARGET)
    layer = _v32_layer(deepseek_vllm, standins, recorder, monkeypatch, "indexer", True)
    real = layer.indexer.wk_weights_proj.forward

    def mutating(hidden_states):
        hidden_states.mul_(1)
        return real(hidden_states)

    monkeypatch.setattr(layer.indexer.wk_weights_proj, "forward", mutating)
    positions, hidden, _ = make_inputs(deepseek_v32_config(), 7)
    recorder.run(lambda: run_v32(rewritten, layer, positions, hidden))
    assert recorder.forks == [DI, MQ]
    with pytest.raises(AssertionError, match="deepseek_indexer_v32: branch 1 writes what branch 0"):
        recorder.assert_no_cross_branch_hazard()
