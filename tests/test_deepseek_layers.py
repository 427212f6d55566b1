"""Layer-level differential tests of deepseek_indexer and mla_q_b_proj on real vLLM layers.

For every code shape the overlay rewrites, the same tiny layer (seeded weights, built by
``deepseek_layers``) and the same inputs go through the upstream function and the rewritten
one, with the same deterministic stand-ins for what cannot run on the CPU. The outputs must
be bit-identical, every stand-in of that path must have run exactly as often in both runs,
and only the rewritten forward may have gone through the overlay's stream primitive (on the
CPU it runs serially: ``VLLM_OVERLAP_TEST_OP_PATH=1``, see conftest). Mutation tests show
each comparison can fail; compile tests show the legacy Indexer's op path traces to one
opaque op per layer, with the layer passed as a graph input.

Targets:

* ``DeepseekV32Attention.forward`` (both features stacked) and its ROCm subclass's forward
  (deepseek_indexer only);
* ``deepseek_v2.Indexer.forward`` (deepseek_indexer);
* ``MultiHeadLatentAttentionWrapper.forward`` (mla_q_b_proj).
"""

from __future__ import annotations

import re
import types
from collections import Counter

import pytest
import torch
from conftest import functions, site_runtime, wrap_branch
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
    identical,
    make_inputs,
    run_indexer,
    run_mla_wrapper,
    run_v32,
)

from vllm_overlap.engine import rewrite
from vllm_overlap.sites import FEATURES

EXPECTED_FEATURES = {
    V32_TARGET: ["deepseek_indexer", "mla_q_b_proj"],
    ROCM_TARGET: ["deepseek_indexer"],
    INDEXER_TARGET: ["deepseek_indexer"],
    WRAPPER_TARGET: ["mla_q_b_proj"],
}

V32_STANDINS = Counter(
    {
        "fused_norm_rope": 1,
        "fused_q": 1,
        "sparse_indexer_and_attn": 1,
        "impl.prepare_for_batch": 1,
        "impl.record_logical_topk_ready": 1,
    }
)

# what the plugin passes the DeepSeek features' shared post-load step
DEEPSEEK = (FEATURES["deepseek_indexer"], FEATURES["mla_q_b_proj"])


# --------------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------------






def differential(standins, count_forks, run_upstream, run_rewritten):
    """Run upstream then rewritten; return (upstream result, rewritten result, upstream
    stand-in calls, rewritten stand-in calls, forks of the rewritten run)."""
    standins.calls.clear()
    expected = run_upstream()
    upstream_calls = Counter(standins.calls)
    assert count_forks == [], "the upstream forward went through the stream primitive"
    standins.calls.clear()
    actual = run_rewritten()
    return expected, actual, upstream_calls, Counter(standins.calls), list(count_forks)


def perturb(t: torch.Tensor) -> torch.Tensor:
    """About one bf16 ulp on every element (a new tensor)."""
    out = t * 1.01
    assert not torch.equal(out, t)
    return out


def _indexer_inputs(hf, tokens, dtype):
    positions, _, qr = make_inputs(hf, tokens, dtype=dtype)
    hidden = make_inputs(hf, tokens, seed=1, dtype=dtype)[1]
    return hidden, qr, positions


def _expected_indexer_standins(branch: str, dtype: torch.dtype) -> Counter:
    # upstream takes the fused-q branch only for bf16 q; otherwise the generic one
    if branch == "fused_q" and dtype == torch.bfloat16:
        return Counter({"indexer_op": 1, "fused_indexer_q_rope_quant": 1})
    calls = Counter({"indexer_op": 1, "per_token_group_quant_fp8": 1})
    if branch == "rocm_inplace":
        calls["rope_inplace"] = 1
    return calls


DTYPES = [torch.bfloat16, torch.float32]
DTYPE_IDS = ["bf16", "fp32"]


# --------------------------------------------------------------------------------------------
# Rewrites applied where expected
# --------------------------------------------------------------------------------------------


def test_every_target_is_rewritten_with_its_stack(deepseek_overlay):
    for target, features in EXPECTED_FEATURES.items():
        assert rewrite.applied_features(target) == features
        assert "_vllm_overlap_" not in rewrite.upstream_source(target)
    assert "_vllm_overlap_deepseek_indexer.a_proj(self, hidden_states)" in rewrite.current_source(
        V32_TARGET
    )
    assert "_vllm_overlap_mla_q_b_proj.q_b_proj_beside_index_q(" in rewrite.current_source(
        V32_TARGET
    )
    source = rewrite.current_source(INDEXER_TARGET)
    assert source.count("_vllm_overlap_deepseek_indexer.q_and_k(") == 1
    assert "self.wk_weights_proj(" not in source and "self.k_norm(" not in source
    assert "self.wq_b(" not in source
    # made once, used in each of the 3 branches
    assert len(re.findall(r"\b_vllm_overlap_k\b", source)) == 1 + 3
    assert len(re.findall(r"\b_vllm_overlap_kw\b", source)) == 1 + 3
    source = rewrite.current_source(WRAPPER_TARGET)
    assert "_vllm_overlap_mla_q_b_proj.q_proj_beside_indexer(" in source
    assert "self.indexer(" not in source and "self.rotary_emb(" not in source


def test_rocm_subclass_forward_is_rewritten_to_call_a_proj(deepseek_overlay):
    from vllm.models.deepseek_v32.amd.rocm import DeepseekV32MLAAttention
    from vllm.models.deepseek_v32.attention import DeepseekV32Attention

    assert issubclass(DeepseekV32MLAAttention, DeepseekV32Attention)
    assert "forward" in vars(DeepseekV32MLAAttention)  # its own forward, rewritten on its own
    upstream, rewritten = functions(ROCM_TARGET)
    assert upstream is not DeepseekV32Attention.forward
    source = rewrite.current_source(ROCM_TARGET)
    original = rewrite.upstream_source(ROCM_TARGET)
    assert "self.indexer.wk_weights_proj(hidden_states)" in original
    assert "self.fused_qkv_a_proj(hidden_states)" in original
    assert source.count("_vllm_overlap_deepseek_indexer.a_proj(self, hidden_states)") == 1
    assert "self.indexer.wk_weights_proj(" not in source
    assert "self.fused_qkv_a_proj(" not in source
    assert "self._fused_attention(" in source  # the rest of the function still flows
    assert rewritten.__globals__ is upstream.__globals__  # it lives in the ROCm module


# --------------------------------------------------------------------------------------------
# Legacy Indexer (deepseek_indexer: q_and_k)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("tokens", [1, 7])
@pytest.mark.parametrize("branch", INDEXER_BRANCHES)
def test_indexer_rewritten_matches_upstream(
    deepseek_vllm, standins, count_forks, monkeypatch, branch, tokens, dtype
):
    hf = deepseek_v32_config()
    upstream, rewritten = functions(INDEXER_TARGET)
    indexer = build_indexer(deepseek_vllm, hf, standins=standins, dtype=dtype, seed=1)
    rope = standins.select_indexer_branch(
        monkeypatch, indexer, branch, build_indexer_rope(hf, dtype)
    )
    hidden, qr, positions = _indexer_inputs(hf, tokens, dtype)

    expected, actual, up_calls, rw_calls, forks = differential(
        standins,
        count_forks,
        lambda: run_indexer(upstream, indexer, hidden, qr, positions, rope),
        lambda: run_indexer(rewritten, indexer, hidden, qr, positions, rope),
    )
    want = _expected_indexer_standins(branch, dtype)
    assert up_calls == want
    assert rw_calls == want
    assert forks == [("deepseek_indexer_legacy", tokens)]
    assert expected[0].shape == (tokens, hf.index_topk)
    assert not (expected[0] == -1).all()  # the indexer op wrote its rows
    assert identical(expected, actual)


@pytest.mark.parametrize("output", ["q", "kw_weights", "k"])
def test_indexer_comparison_fails_on_a_perturbed_output(
    deepseek_vllm, standins, count_forks, monkeypatch, output
):
    """Each of the op's three outputs reaches the compared result: one ulp-ish off in any
    of them makes the comparison fail."""
    hf = deepseek_v32_config()
    upstream, rewritten = functions(INDEXER_TARGET)
    indexer = build_indexer(deepseek_vllm, hf, standins=standins, seed=1)
    rope = build_indexer_rope(hf)
    hidden, qr, positions = _indexer_inputs(hf, 7, torch.bfloat16)
    expected = run_indexer(upstream, indexer, hidden, qr, positions, rope)
    assert identical(expected, run_indexer(rewritten, indexer, hidden, qr, positions, rope))

    def mutated_k_path(kw_k):
        kw, k = kw_k
        if output == "kw_weights":
            kw = kw.clone()
            kw[:, indexer.head_dim :] = perturb(kw[:, indexer.head_dim :])
        else:
            k = perturb(k)
        return kw, k

    if output == "q":
        wrap_branch(monkeypatch, "deepseek_indexer_legacy", "current", perturb)
    else:
        wrap_branch(monkeypatch, "deepseek_indexer_legacy", "aux", mutated_k_path)
    assert not identical(expected, run_indexer(rewritten, indexer, hidden, qr, positions, rope))


def test_indexer_without_a_second_stream_runs_upstream_statements(
    deepseek_vllm, standins, count_forks, monkeypatch
):
    """The CPU default (no VLLM_OVERLAP_TEST_OP_PATH): no stream primitive, same result."""
    from vllm_overlap.runtime import gates

    hf = deepseek_v32_config()
    upstream, rewritten = functions(INDEXER_TARGET)
    indexer = build_indexer(deepseek_vllm, hf, standins=standins, seed=1)
    rope = build_indexer_rope(hf)
    hidden, qr, positions = _indexer_inputs(hf, 5, torch.bfloat16)
    expected = run_indexer(upstream, indexer, hidden, qr, positions, rope)
    monkeypatch.setattr(gates, "_OVERLAP_POSSIBLE", False)
    actual = run_indexer(rewritten, indexer, hidden, qr, positions, rope)
    assert count_forks == []
    assert identical(expected, actual)


# ---- the op path under torch.compile ------------------------------------------------------


@pytest.fixture
def traceable_standins(monkeypatch):
    """The stand-ins' fixed random projections, looked up in a table instead of made with a
    torch.Generator (an opaque object Dynamo refuses to create inside a graph)."""
    import deepseek_standins

    table = {}
    real = deepseek_standins._projection

    def projection(inputs, width):
        key = (inputs, width)
        if key not in table:
            if torch.compiler.is_compiling():
                raise AssertionError(f"projection {key} not prepared before compiling")
            table[key] = real(inputs, width)
        return table[key]

    monkeypatch.setattr(deepseek_standins, "_projection", projection)
    return table


def _compile(fn, dynamic=None):
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    counter = CompileCounterWithBackend("aot_eager")
    return torch.compile(fn, backend=counter, fullgraph=True, dynamic=dynamic), counter


def one_graph(counter):
    """The one graph compiled (fullgraph=True already refuses graph breaks). With
    ``dynamic=True`` Dynamo restarts its analysis once to turn float attributes into graph
    inputs, and that first attempt reaches the backend as an empty graph: not counted."""
    from torch._dynamo.utils import counters

    graphs = [g for g in counter.graphs if any(n.op == "call_function" for n in g.graph.nodes)]
    assert len(graphs) == 1, [g.code for g in graphs]
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"] and not counters["recompiles"]
    return graphs[0]


def _op_nodes(graph_module):
    op = torch.ops.vllm_overlap.deepseek_indexer
    return [n for n in graph_module.graph.nodes if n.target in (op, op.default)]


def test_compiled_indexer_forward_is_one_op_and_matches_upstream_eager(
    deepseek_vllm, standins, traceable_standins, count_forks
):
    hf = deepseek_v32_config()
    upstream, rewritten = functions(INDEXER_TARGET)
    indexer = build_indexer(deepseek_vllm, hf, standins=standins, seed=1)
    rope = build_indexer_rope(hf)

    def forward(layer, hidden_states, qr, positions, rotary_emb):
        return rewritten(layer, hidden_states, qr, positions, rotary_emb)

    compiled, counter = _compile(forward, dynamic=True)
    for tokens in (7, 5, 33):
        hidden, qr, positions = _indexer_inputs(hf, tokens, torch.bfloat16)
        expected = run_indexer(upstream, indexer, hidden, qr, positions, rope)
        standins.calls.clear()
        count_forks.clear()
        actual = run_indexer(compiled, indexer, hidden, qr, positions, rope)
        assert identical(expected, actual), tokens
        assert standins.calls == Counter({"indexer_op": 1, "per_token_group_quant_fp8": 1})
        # the op's body runs the stream primitive once (at run time, not traced)
        assert count_forks == [("deepseek_indexer_legacy", tokens)]
    graph = one_graph(counter)  # no graph break, no recompile across token counts
    assert len(_op_nodes(graph)) == 1
    code = graph.code
    assert "wk_weights_proj" not in code and "k_norm" not in code  # inside the op, opaque
    import vllm.utils.torch_utils as tu

    if getattr(tu, "_USE_LAYERNAME", False):
        assert indexer.prefix not in code, code


def test_two_indexers_through_one_compiled_function_share_one_graph(
    deepseek_vllm, standins, traceable_standins
):
    """Different prefixes (and weights) through the same compiled function: no recompile,
    each call resolves its own layer."""
    import vllm.utils.torch_utils as tu

    if not getattr(tu, "_USE_LAYERNAME", False):
        pytest.skip("this vLLM/torch has no opaque LayerName; names are plain strings")
    hf = deepseek_v32_config()
    upstream, rewritten = functions(INDEXER_TARGET)
    rope = build_indexer_rope(hf)
    indexers = [build_indexer(deepseek_vllm, hf, standins=standins, seed=s) for s in (1, 2)]
    assert indexers[0].prefix != indexers[1].prefix

    def forward(layer, hidden_states, qr, positions, rotary_emb):
        return rewritten(layer, hidden_states, qr, positions, rotary_emb)

    compiled, counter = _compile(forward)
    hidden, qr, positions = _indexer_inputs(hf, 6, torch.bfloat16)
    results = []
    for indexer in indexers:
        expected = run_indexer(upstream, indexer, hidden, qr, positions, rope)
        standins.calls.clear()  # the stand-ins' counters are guarded Python state
        actual = run_indexer(compiled, indexer, hidden, qr, positions, rope)
        standins.calls.clear()
        assert identical(expected, actual)
        results.append(actual)
    assert not identical(results[0], results[1])
    assert counter.frame_count == 1
    assert len(_op_nodes(one_graph(counter))) == 1


# --------------------------------------------------------------------------------------------
# Legacy MLA wrapper (mla_q_b_proj: q_proj_beside_indexer)
# --------------------------------------------------------------------------------------------


def _use_upstream_indexer_forward(monkeypatch, indexer):
    upstream, _ = functions(INDEXER_TARGET)
    monkeypatch.setattr(indexer, "forward", types.MethodType(upstream, indexer))


@pytest.mark.parametrize("tokens", [1, 7])
@pytest.mark.parametrize("indexer_forward", ["upstream", "rewritten"])
def test_mla_wrapper_with_indexer_matches_upstream(
    deepseek_vllm, standins, count_forks, monkeypatch, tokens, indexer_forward
):
    """Upstream: upstream wrapper + upstream Indexer. Rewritten: the rewritten wrapper with
    the upstream Indexer (mla_q_b_proj alone) or the rewritten one (both features)."""
    hf = deepseek_v32_config()
    upstream, rewritten = functions(WRAPPER_TARGET)
    wrapper = build_mla_wrapper(deepseek_vllm, hf, True, standins=standins)
    positions, hidden, _ = make_inputs(hf, tokens)

    def run_upstream():
        with monkeypatch.context() as m:
            _use_upstream_indexer_forward(m, wrapper.indexer)
            return run_mla_wrapper(upstream, wrapper, positions, hidden)

    def run_rewritten():
        with monkeypatch.context() as m:
            if indexer_forward == "upstream":
                _use_upstream_indexer_forward(m, wrapper.indexer)
            return run_mla_wrapper(rewritten, wrapper, positions, hidden)

    expected, actual, up_calls, rw_calls, forks = differential(
        standins, count_forks, run_upstream, run_rewritten
    )
    want = Counter(
        {
            "mla_attn": 1,
            "indexer_op": 1,
            "per_token_group_quant_fp8": 1,
            "impl.record_logical_topk_ready": 1,
        }
    )
    assert up_calls == want and rw_calls == want
    if indexer_forward == "upstream":
        assert forks == [("mla_q_b_proj_legacy", tokens)]
    else:  # the indexer (branch 0 of mla_q_b_proj) forks itself
        assert forks == [("mla_q_b_proj_legacy", tokens), ("deepseek_indexer_legacy", tokens)]
    assert len(expected) == 2 and not (expected[1] == -1).all()
    assert identical(expected, actual)


@pytest.mark.parametrize("tokens", [1, 7])
def test_mla_wrapper_without_indexer_matches_upstream_serially(
    deepseek_vllm, standins, count_forks, monkeypatch, tokens
):
    from vllm_overlap.runtime import deepseek_post_load as census

    hf = deepseek_v3_config()
    upstream, rewritten = functions(WRAPPER_TARGET)
    wrapper = build_mla_wrapper(deepseek_vllm, hf, False, standins=standins)
    assert wrapper.indexer is None and not wrapper.is_sparse
    positions, hidden, _ = make_inputs(hf, tokens)
    expected, actual, up_calls, rw_calls, forks = differential(
        standins,
        count_forks,
        lambda: run_mla_wrapper(upstream, wrapper, positions, hidden),
        lambda: run_mla_wrapper(rewritten, wrapper, positions, hidden),
    )
    assert up_calls == rw_calls == Counter({"mla_attn": 1})
    assert forks == []  # nothing to overlap with
    assert identical(expected, actual)

    from vllm_overlap.runtime import reports

    monkeypatch.setattr(reports, "post_load_reports", {})
    report = census.post_load(wrapper, DEEPSEEK)
    assert report == {
        "mla_layers": 1,
        "with_indexer": 0,
        "serial": {census.NO_INDEXER: 1},
    }
    assert census.NO_INDEXER == "no indexer"
    assert reports.post_load_reports == {"deepseek_indexer": report, "mla_q_b_proj": report}


def test_mla_wrapper_census_with_an_indexer(deepseek_vllm, standins, monkeypatch):
    from vllm_overlap.runtime import deepseek_post_load as census
    from vllm_overlap.runtime import layer_registry as layers
    from vllm_overlap.runtime import reports

    wrapper = build_mla_wrapper(deepseek_vllm, deepseek_v32_config(), True, standins=standins)
    monkeypatch.setattr(reports, "post_load_reports", {})
    report = census.post_load(wrapper, DEEPSEEK)
    assert report == {"mla_layers": 1, "with_indexer": 1, "serial": {}}
    assert layers.registered_layers()[wrapper.indexer.prefix] is wrapper.indexer


@pytest.mark.parametrize("output", ["q", "k_pe", "no_indexer_call"])
def test_mla_wrapper_comparison_fails_on_a_mutation(
    deepseek_vllm, standins, monkeypatch, output
):
    hf = deepseek_v32_config()
    upstream, rewritten = functions(WRAPPER_TARGET)
    wrapper = build_mla_wrapper(deepseek_vllm, hf, True, standins=standins)
    positions, hidden, _ = make_inputs(hf, 7)
    expected = run_mla_wrapper(upstream, wrapper, positions, hidden)
    assert identical(expected, run_mla_wrapper(rewritten, wrapper, positions, hidden))

    if output == "no_indexer_call":
        compiled = site_runtime("mla_q_b_proj_legacy").compiled
        monkeypatch.setitem(compiled.branches, "current", lambda *args: None)
    else:

        def mutated(q_heads_k_pe):
            q, heads, k_pe = q_heads_k_pe
            if output == "q":
                q = perturb(q)
            else:
                k_pe = perturb(k_pe)
            return q, heads, k_pe

        wrap_branch(monkeypatch, "mla_q_b_proj_legacy", "aux", mutated)
    assert not identical(expected, run_mla_wrapper(rewritten, wrapper, positions, hidden))


# --------------------------------------------------------------------------------------------
# DeepseekV32Attention (both features stacked) and the ROCm subclass's forward
# --------------------------------------------------------------------------------------------

V32_VARIANTS = ("indexer", "no_indexer", "skip_topk")


def _clones(values) -> list:
    out = []
    for v in values:
        if isinstance(v, torch.Tensor):  # (identical cannot byte-view a 0-dim tensor)
            out.append(v.detach().clone().reshape(v.shape or (1,)))
        elif isinstance(v, (tuple, list)):
            out += _clones(v)
    return out


def _v32_layer(vllm_config, standins, variant, monkeypatch, prepare_mqa_query=True):
    """A V3.2 layer whose stand-ins' tensor arguments (after the call: in-place outputs
    included) and results are recorded in ``layer._probe``. The final output alone is blind
    to small intermediates: the sparse attention stand-in's signature is a bf16 mix in which
    index_weights_out (~1e-4) does not move a single bit, so run_probed compares them all."""
    import vllm.models.deepseek_v32.attention as v32

    layer = build_v32_attention(
        vllm_config, deepseek_v32_config(), variant != "no_indexer", standins=standins
    )
    layer.skip_topk = variant == "skip_topk"
    assert (layer.indexer is None) == (variant == "no_indexer")
    if not prepare_mqa_query:
        monkeypatch.setattr(layer, "_should_prepare_mqa_query", lambda *args: False)
    probe: list = []

    def recording(name, fn):
        def wrapper(*args, **kwargs):
            result = fn(*args, **kwargs)
            probe.append((name, _clones(args) + _clones(kwargs.values()) + _clones([result])))
            return result

        return wrapper

    for name in ("fused_norm_rope", "fused_q"):
        monkeypatch.setattr(v32, name, recording(name, getattr(v32, name)))
    monkeypatch.setattr(
        layer,
        "_sparse_indexer_and_attn",
        recording("sparse_indexer_and_attn", layer._sparse_indexer_and_attn),
    )
    layer._probe = probe
    return layer


def run_probed(forward_fn, layer, positions, hidden_states) -> tuple:
    """run_v32's (output, top-k rows), then every recorded stand-in tensor, in call order."""
    layer._probe.clear()
    result = run_v32(forward_fn, layer, positions, hidden_states)
    names = [name for name, _ in layer._probe]
    assert names == ["fused_norm_rope", "fused_q", "sparse_indexer_and_attn"], names
    return result + tuple(t for _, tensors in layer._probe for t in tensors)


def _v32_forks(variant, tokens, stack):
    if variant != "indexer":
        return []
    return [(feature, tokens) for feature in stack]


# The sites on DeepseekV32Attention.forward, each alone and both in either order (the
# overlay applies them in stacking order: deepseek_indexer_v32, then mla_q_b_proj_v32).
V32_STACKS = {
    "indexer_alone": ("deepseek_indexer_v32",),
    "q_b_proj_alone": ("mla_q_b_proj_v32",),
    "both": ("deepseek_indexer_v32", "mla_q_b_proj_v32"),
    "both_reversed": ("mla_q_b_proj_v32", "deepseek_indexer_v32"),
}


@pytest.fixture
def v32_stacked(deepseek_overlay):
    """``apply(site_ids)``: DeepseekV32Attention.forward rewritten by exactly these sites, in
    this order, through the plugin; returns the installed function. The overlay's own stack
    is put back after."""
    from vllm_overlap import outcomes
    from vllm_overlap.runtime import plugin
    from vllm_overlap.sites import FEATURES, SITES

    def apply_site(site, rw):
        outcome = plugin.apply_rewrite(FEATURES[site.feature], site, rw)
        assert outcome.status == outcomes.APPLIED, outcome.describe()

    def apply(site_ids):
        rewrite.revert(V32_TARGET)
        for site_id in site_ids:
            site = SITES[site_id]
            rw = next(r for r in FEATURES[site.feature].rewrites if r.site == site_id and r.target == V32_TARGET)
            apply_site(site, rw)
        owner, attr = rewrite.resolve_owner(V32_TARGET)
        return getattr(owner, attr)

    yield apply
    rewrite.revert(V32_TARGET)
    for site, rw in plugin.stacking_order(V32_TARGET.module):
        if rw.target == V32_TARGET:
            apply_site(site, rw)
    assert rewrite.applied_features(V32_TARGET) == EXPECTED_FEATURES[V32_TARGET]


def test_the_overlay_stacks_the_v32_sites_in_their_declared_order(deepseek_overlay):
    from vllm_overlap.runtime import plugin

    order = [site.id for site, rw in plugin.stacking_order(V32_TARGET.module) if rw.target == V32_TARGET]
    assert order == list(V32_STACKS["both"])


@pytest.mark.parametrize("prepare_mqa_query", [True, False], ids=["mqa_q", "no_mqa_q"])
@pytest.mark.parametrize("tokens", [1, 7])
@pytest.mark.parametrize("variant", V32_VARIANTS)
@pytest.mark.parametrize("stack", V32_STACKS)
def test_v32_attention_rewritten_matches_upstream(
    deepseek_vllm, standins, count_forks, monkeypatch, v32_stacked, stack, variant, tokens, prepare_mqa_query
):
    """Each site alone and both stacked, in either order: bit-identical to upstream, and
    (with an active indexer) each site forks once, in the forward's order."""
    upstream, _ = functions(V32_TARGET)
    rewritten = v32_stacked(V32_STACKS[stack])
    layer = _v32_layer(deepseek_vllm, standins, variant, monkeypatch, prepare_mqa_query)
    positions, hidden, _ = make_inputs(deepseek_v32_config(), tokens)

    expected, actual, up_calls, rw_calls, forks = differential(
        standins,
        count_forks,
        lambda: run_probed(upstream, layer, positions, hidden),
        lambda: run_probed(rewritten, layer, positions, hidden),
    )
    assert up_calls == V32_STANDINS and rw_calls == V32_STANDINS
    in_forward_order = [s for s in V32_STACKS["both"] if s in V32_STACKS[stack]]
    assert forks == _v32_forks(variant, tokens, in_forward_order)
    assert len(expected) > 2 + 20  # output, top-k rows and the stand-ins' tensors
    assert identical(expected, actual)


def test_v32_prepare_mqa_query_is_steered(deepseek_vllm, standins, monkeypatch):
    """The no_mqa_q case above really takes the other path (ql_nope without the W_UK_T bmm)."""
    _, rewritten = functions(V32_TARGET)
    positions, hidden, _ = make_inputs(deepseek_v32_config(), 7)
    layer = _v32_layer(deepseek_vllm, standins, "indexer", monkeypatch, True)
    first = run_v32(rewritten, layer, positions, hidden)
    monkeypatch.setattr(layer, "_should_prepare_mqa_query", lambda *args: False)
    second = run_v32(rewritten, layer, positions, hidden)
    assert not identical(first[:1], second[:1])


@pytest.mark.parametrize(
    "mutation",
    [
        "a_proj:qkv_lora",
        "a_proj:index_k",
        "a_proj:index_weights",
        "q_b:ql_nope",
        "q_b:q_pe",
        "q_b:index_q",
    ],
)
def test_v32_comparison_fails_on_a_perturbed_output(
    deepseek_vllm, standins, monkeypatch, mutation
):
    upstream, rewritten = functions(V32_TARGET)
    layer = _v32_layer(deepseek_vllm, standins, "indexer", monkeypatch)
    positions, hidden, _ = make_inputs(deepseek_v32_config(), 7)
    expected = run_probed(upstream, layer, positions, hidden)
    assert identical(expected, run_probed(rewritten, layer, positions, hidden))

    function, what = mutation.split(":")
    if function == "a_proj":
        _perturb_a_proj(monkeypatch, layer, what, V32_TARGET.module)
    elif what == "index_q":
        wrap_branch(monkeypatch, "mla_q_b_proj_v32", "current", perturb)
    else:

        def mutated(q_outputs):
            q, q_nope, q_pe, ql_nope = q_outputs
            if what == "ql_nope":
                ql_nope = perturb(ql_nope)
            else:
                q_pe = perturb(q_pe)
            return q, q_nope, q_pe, ql_nope

        wrap_branch(monkeypatch, "mla_q_b_proj_v32", "aux", mutated)
    assert not identical(expected, run_probed(rewritten, layer, positions, hidden))


def _perturb_a_proj(monkeypatch, layer, what: str, module: str) -> None:
    """Perturb qkv_lora (the current branch) or the index_k / weights columns of kw (aux)."""
    if what == "qkv_lora":
        wrap_branch(monkeypatch, "deepseek_indexer_v32", "current", perturb, module)
        return

    def mutated(kw):
        kw = kw.clone()
        head_dim = layer.indexer.head_dim
        cols = slice(None, head_dim) if what == "index_k" else slice(head_dim, None)
        kw[:, cols] = perturb(kw[:, cols])
        return kw

    wrap_branch(monkeypatch, "deepseek_indexer_v32", "aux", mutated, module)


def _fused_attention_standin(layer, calls: Counter, seen: list):
    """The ROCm forward's ``_fused_attention`` (AITER kernels), called with its real signature:
    a signature of every tensor it is given written into ``output``; counted; its tensor
    arguments recorded in ``seen``."""
    import functools

    from deepseek_standins import _mix
    from kernel_standin import standin
    from vllm.models.deepseek_v32.amd.rocm import DeepseekV32MLAAttention

    def fused_attention(*, output, **tensors):
        tokens, width = output.shape
        output.copy_(_mix(tokens, width, *tensors.values()))
        seen.extend(_clones(list(tensors.values())))

    real = functools.partial(DeepseekV32MLAAttention._fused_attention, layer)
    return standin(real, fused_attention, calls, "rocm._fused_attention")


@pytest.mark.parametrize("tokens", [1, 7])
@pytest.mark.parametrize("variant", V32_VARIANTS)
def test_rocm_forward_rewritten_matches_upstream(
    deepseek_vllm, standins, count_forks, monkeypatch, variant, tokens
):
    """The ROCm subclass's forward (its __init__ needs AITER) run unbound on a CPU-built
    DeepseekV32Attention, whose attributes it shares, with ``_fused_attention`` stood in."""
    upstream, rewritten = functions(ROCM_TARGET)
    layer = _v32_layer(deepseek_vllm, standins, variant, monkeypatch)
    seen: list = []
    fused = _fused_attention_standin(layer, standins.calls, seen)
    monkeypatch.setattr(layer, "_fused_attention", fused, raising=False)
    positions, hidden, _ = make_inputs(deepseek_v32_config(), tokens)

    def run(forward_fn):
        seen.clear()
        return run_v32(forward_fn, layer, positions, hidden) + tuple(seen)

    expected, actual, up_calls, rw_calls, forks = differential(
        standins, count_forks, lambda: run(upstream), lambda: run(rewritten)
    )
    assert up_calls == rw_calls == Counter({"rocm._fused_attention": 1})
    assert forks == _v32_forks(variant, tokens, ["deepseek_indexer_v32"])
    assert len(expected) == 2 + (6 if variant == "indexer" else 4)  # index_k/weights or None
    assert identical(expected, actual)


@pytest.mark.parametrize("what", ["qkv_lora", "index_k", "index_weights"])
def test_rocm_comparison_fails_on_a_perturbed_a_proj(
    deepseek_vllm, standins, monkeypatch, what
):
    upstream, rewritten = functions(ROCM_TARGET)
    layer = _v32_layer(deepseek_vllm, standins, "indexer", monkeypatch)
    fused = _fused_attention_standin(layer, standins.calls, [])
    monkeypatch.setattr(layer, "_fused_attention", fused, raising=False)
    positions, hidden, _ = make_inputs(deepseek_v32_config(), 7)
    expected = run_v32(upstream, layer, positions, hidden)  # the output alone, here
    assert identical(expected, run_v32(rewritten, layer, positions, hidden))
    _perturb_a_proj(monkeypatch, layer, what, ROCM_TARGET.module)
    assert not identical(expected, run_v32(rewritten, layer, positions, hidden))
