"""Fork/join structure of every region the DeepSeek features rewrite, without a GPU.

``vllm_overlap.streams.run_pair`` is replaced by a recorder that logs the fork, runs fn0 as
"branch 0" (the current stream), fn1 as "branch 1" (the aux stream), and logs the join. The
layers' submodules and the stand-ins log each call with the branch it ran on, so each test
asserts the exact sequence: which statements went to which stream, and that every consumer
of a region's outputs runs after its join. A TorchDispatchMode records, per branch, which
storages each aten/custom op read and wrote: nothing one branch writes may be read or
written by the other (the two would race on a GPU).

Storages are followed by lifetime, not by address: every tensor an op inside a fork touches
or makes is kept alive until the recording ends, so no two storages the check compares can
share an address (a CPU allocator hands a freed temporary of one branch to the other; a GPU's
caching allocator would not, across streams). An op's result is a write only when it is new
memory or its schema marks it written: a view (``view``, ``slice``, ``t``...) of an input
aliases it and writes nothing.
"""

from __future__ import annotations

import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from deepseek_layers import (
    INDEXER_TARGET,
    ROCM_TARGET,
    V32_TARGET,
    WRAPPER_TARGET,
    INDEXER_BRANCHES,
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
from vllm_overlap import rewrite, streams


# The sites, by code shape: V3.2 CUDA path and the legacy (compiled / MLA wrapper) path.
DI, MQ = "deepseek_indexer_v32", "mla_q_b_proj_v32"
LDI, LMQ = "deepseek_indexer_legacy", "mla_q_b_proj_legacy"
OUT = "outside"


def fork(site):
    return ("fork", site)


def join(site):
    return ("join", site)


def b0(site, name):
    return (f"{site}:branch0", name)


def b1(site, name):
    return (f"{site}:branch1", name)


def out(*names):
    return [(OUT, name) for name in names]


# --------------------------------------------------------------------------------------------
# Fixtures and the recorder
# --------------------------------------------------------------------------------------------


def functions(target):
    owner, attr = rewrite.resolve_owner(target)
    return rewrite._STATE[target].original, getattr(owner, attr)


class Recorder:
    """The stream primitive's stand-in and the log every wrapped call writes to."""

    def __init__(self, monkeypatch):
        self.monkeypatch = monkeypatch
        self.log: list[tuple[str, str]] = []
        self.stack: list[tuple[int, str, int]] = []  # (fork id, site, branch) innermost last
        self.forks: list[str] = []  # site of each fork, by id
        self.accesses: list[tuple[tuple, int, bool]] = []  # (stack, storage, written)
        self._alive: list[torch.Tensor] = []  # no storage is freed and reused mid-run
        monkeypatch.setattr(streams, "run_pair", self.run_pair)

    # ---- the stream primitive --------------------------------------------------------------

    def run_pair(self, site, fn0, fn1, num_tokens, feature):
        fork_id = len(self.forks)
        self.forks.append(site)
        self.log.append(fork(site))
        self.stack.append((fork_id, site, 0))
        try:
            r0 = fn0()
        finally:
            self.stack.pop()
        self.stack.append((fork_id, site, 1))
        try:
            r1 = fn1()
        finally:
            self.stack.pop()
        self.log.append(join(site))
        return r0, r1

    def where(self) -> str:
        if not self.stack:
            return OUT
        _, site, branch = self.stack[-1]
        return f"{site}:branch{branch}"

    # ---- call logging ---------------------------------------------------------------------

    def wrap(self, owner, attr: str, name: str) -> None:
        """Log ``name`` on the current branch whenever ``owner.attr`` is called."""
        real = getattr(owner, attr)

        def logged(*args, **kwargs):
            self.log.append((self.where(), name))
            return real(*args, **kwargs)

        self.monkeypatch.setattr(owner, attr, logged, raising=False)

    def wrap_module(self, module: torch.nn.Module, name: str) -> None:
        self.wrap(module, "forward", name)

    def run(self, fn):
        """Run ``fn`` with the log cleared and storage accesses recorded; return its result."""
        self.log.clear()
        self.forks.clear()
        self.accesses.clear()
        self._alive.clear()
        with _AccessMode(self):
            result = fn()
        assert not self.stack
        return result

    # ---- storage accesses -----------------------------------------------------------------

    def branch_accesses(self, fork_id: int, branch: int):
        """(read storages, written storages) of everything that ran in one branch of a fork,
        nested forks included."""
        reads, writes = set(), set()
        for stack, storage, written in self.accesses:
            if any(f == fork_id and b == branch for f, _, b in stack):
                (writes if written else reads).add(storage)
        return reads, writes

    def assert_no_cross_branch_hazard(self) -> None:
        assert self.forks, "no region forked"
        for fork_id, site in enumerate(self.forks):
            reads0, writes0 = self.branch_accesses(fork_id, 0)
            reads1, writes1 = self.branch_accesses(fork_id, 1)
            assert reads0 and reads1, f"{site}: a branch read nothing (accesses not recorded?)"
            assert not writes1 & (reads0 | writes0), f"{site}: branch 1 writes what branch 0 uses"
            assert not writes0 & (reads1 | writes1), f"{site}: branch 0 writes what branch 1 uses"


def _storage_key(t) -> int | None:
    """The identity of a tensor's storage while it is alive (None: no memory)."""
    if not isinstance(t, torch.Tensor):
        return None
    storage = t.untyped_storage()
    return storage.data_ptr() if storage.nbytes() > 0 else None


class _AccessMode(TorchDispatchMode):
    """Records, for every op that runs inside a fork, each tensor argument's storage and
    whether the op's schema writes it, and each result's storage when the result is new or
    written; keeps every such tensor alive until the run ends."""

    def __init__(self, recorder: Recorder):
        super().__init__()
        self.recorder = recorder

    def _touch(self, t, stack, written: bool) -> None:
        key = _storage_key(t)
        if key is not None:
            self.recorder._alive.append(t)  # its address cannot be reused while we compare
            self.recorder.accesses.append((stack, key, written))

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        rec = self.recorder
        stack = tuple(rec.stack)
        schema = func._schema
        if stack:
            written = {
                a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write
            }
            named = list(zip((a.name for a in schema.arguments), args)) + list(kwargs.items())
            for arg_name, value in named:
                for t in tree_leaves(value):
                    self._touch(t, stack, False)  # in-place ops read too
                    if arg_name in written:
                        self._touch(t, stack, True)
        result = func(*args, **kwargs)
        if stack:
            results = result if isinstance(result, (tuple, list)) and len(schema.returns) > 1 else (result,)
            for ret, value in zip(schema.returns, results):
                # a return that aliases an input without writing it (a view) is no write
                fresh_or_written = ret.alias_info is None or ret.alias_info.is_write
                for t in tree_leaves(value):
                    self._touch(t, stack, fresh_or_written)
        return result


@pytest.fixture
def recorder(monkeypatch):
    return Recorder(monkeypatch)


def without_forks(log):
    """The calls of a log in order, without fork/join and branches."""
    return [name for where, name in log if where not in ("fork", "join")]


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


# --------------------------------------------------------------------------------------------
# The hazard check itself can fail
# --------------------------------------------------------------------------------------------


def test_hazard_check_catches_a_branch_writing_what_the_other_reads(recorder):
    x = torch.randn(4, 8)
    w = torch.randn(8, 8)

    def region():
        return streams.run_pair("probe", lambda: x @ w, lambda: x.mul_(2), 4, None)

    recorder.run(region)
    assert recorder.log == [fork("probe"), join("probe")]
    with pytest.raises(AssertionError, match="branch 1 writes what branch 0 uses"):
        recorder.assert_no_cross_branch_hazard()


def test_hazard_check_passes_independent_branches(recorder):
    x = torch.randn(4, 8)
    w0, w1 = torch.randn(8, 8), torch.randn(8, 3)
    recorder.run(lambda: streams.run_pair("probe", lambda: x @ w0, lambda: x @ w1, 4, None))
    recorder.assert_no_cross_branch_hazard()


def test_hazard_check_ignores_views_of_an_input_both_branches_read(recorder):
    """Both branches reshape the input they share, as vLLM's CPU GEMM kernels do on some
    machines: a view aliases its input, it writes nothing."""
    x = torch.randn(4, 8)
    w0, w1 = torch.randn(8, 8), torch.randn(8, 3)
    recorder.run(
        lambda: streams.run_pair(
            "probe", lambda: x.view(2, 16).view(4, 8) @ w0, lambda: x.t().t()[:, :8] @ w1, 4, None
        )
    )
    recorder.assert_no_cross_branch_hazard()


def test_hazard_check_catches_a_write_through_a_view(recorder):
    x = torch.randn(4, 8)
    w0 = torch.randn(8, 8)
    recorder.run(lambda: streams.run_pair("probe", lambda: x @ w0, lambda: x.view(32)[:8].add_(0), 4, None))
    with pytest.raises(AssertionError, match="branch 1 writes what branch 0 uses"):
        recorder.assert_no_cross_branch_hazard()


def test_hazard_check_ignores_a_temporary_freed_in_one_branch_and_a_new_tensor_in_the_other(
    recorder,
):
    """Branch 0's products are freed inside the branch; branch 1 then makes tensors of the
    same sizes, which a CPU allocator tends to place at the freed addresses (glibc's does for
    some of these sizes). Different tensors, no hazard."""
    sizes = (8, 16, 24, 32, 48, 64)
    x = {n: torch.randn(n, n) for n in sizes}
    w0 = {n: torch.randn(n, n) for n in sizes}
    w1 = {n: torch.randn(n, n) for n in sizes}

    def branch0():  # each product is a temporary, freed before the branch returns
        return [(x[n] @ w0[n]).exp().sum() for n in sizes]

    def branch1():  # new tensors of the same sizes
        return [x[n] @ w1[n] for n in sizes]

    recorder.run(lambda: streams.run_pair("probe", branch0, branch1, 8, None))
    recorder.assert_no_cross_branch_hazard()


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
