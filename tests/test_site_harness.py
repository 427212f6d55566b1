"""One harness over the declared sites: for each, a tiny real vLLM layer and the entry the
rewritten code calls. A site supplies its case (``SiteCase``, in ``CASES`` below); everything
else is generic (docs/adding-a-site.md: the files a new site touches).

For every site:
- the overlapped path (the stream primitive, serial on this CPU) gives exactly what the
  serial path, compiled from upstream's matched statements, gives;
- each branch's effect reaches the result: perturbing its output (or skipping a branch that
  returns nothing) makes the comparison fail;
- fork/join: the entry forks once, and no storage one branch writes is read or written by
  the other (``fork_join_recorder``, storages followed by lifetime);
- serial fallbacks: no second stream, a LoRA-wrapped projection, an inactive layer (only the
  branch upstream's condition does not guard runs), both token bounds of the site's
  configured range, a dual-batch-overlap micro-batch thread;
- the census: a model holding the site's layer has a row for the site, counting the layer as
  overlapping, or (inactive) as serial with upstream's condition as the reason;

and for every ``op`` site: opcheck and an exact fake kernel at 0, 1, 7, 256 and 1025 tokens in
bf16 and fp32, a symbolic token count, the real op refusing what the fake did not promise, and
one compiled graph for any number of layers with ``LayerName`` inputs (a ``str`` name, the
negative control, is baked into the graph).

The forwards around the sites are compared with upstream's in the per-model layer tests
(``test_gdn_in_proj_layer``, ``test_deepseek_layers``), which also cover each stacking order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from conftest import same_tensors, site_entry, site_runtime, tensors_of, wrap_branch
from linear_no_rows import skip_where_no_rows_kill_vllms_linear

from vllm_overlap.config import active as active_config
from vllm_overlap.config.loader import LoadedConfig, OverlayConfig
from vllm_overlap.runtime import streams
from vllm_overlap.sites import SITES

BF16 = torch.bfloat16

# ---------------------------------------------------------------------------------------------
# Cases: one ``SiteCase`` per declared site, all the harness knows about it
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteCase:
    """One site in the harness. ``layer(request, site_id, dtype, seed)`` -> (the tiny real vLLM
    layer, its model config); the entry's arguments are made from them as the layer benchmark
    makes them (``SITE_LAYERS[site_id].inputs``). The rest is needed only where the site's
    declaration has the matching part:

    - ``effect``: (reset, observe) for a branch that writes layer state instead of returning
      it (reset before a run, what to compare after it);
    - ``deactivate``: makes the layer inactive, where a form has upstream's ``active`` condition;
    - ``unreach``: makes the layer take upstream's other path, where the site has ``reached_when``;
    - ``widths``: each op output's width on one rank, by the model's formulas on the tiny config
      (never read from the layer), for an ``op`` site;
    - ``heads``: (output index, head size) for each op output viewed as heads;
    - ``seed``: the layer's weights when a test does not choose them."""

    site_id: str
    layer: Callable
    effect: tuple[Callable, Callable] | None = None
    deactivate: Callable | None = None
    unreach: Callable | None = None
    widths: tuple[int, ...] = ()
    heads: tuple[tuple[int, int], ...] = ()
    seed: int = 0

    def args(self, request, tokens, dtype=BF16, seed=None) -> tuple:
        """The entry's arguments at ``tokens`` tokens, the layer first, seeded; a 0-token case
        this machine's vLLM linear layers cannot run is skipped (``linear_no_rows``)."""
        from vllm_overlap.testing.layer_builders import SITE_LAYERS

        layer, hf = self.layer(request, self.site_id, dtype, self.seed if seed is None else seed)
        if tokens == 0:
            model = request.getfixturevalue("vllm_context").model_config.model
            skip_where_no_rows_kill_vllms_linear(layer, model)
        gen = torch.Generator().manual_seed(tokens)
        return SITE_LAYERS[self.site_id].inputs(layer, hf, tokens, dtype, "cpu", gen)

    def shapes(self, tokens) -> list[tuple[int, ...]]:
        """Each op output's shape at ``tokens`` tokens: (tokens, width), or (tokens, width //
        head size, head size) for an output viewed as heads."""
        heads = dict(self.heads)
        return [
            (tokens, w) if i not in heads else (tokens, w // heads[i], heads[i])
            for i, w in enumerate(self.widths)
        ]


def _tiny(config, vllm="vllm_context", prepare=None):
    """The layer as the layer benchmark builds it (``SITE_LAYERS[site_id].build``), from the
    tiny model config ``tiny_models.<config>()`` and the ``vllm`` fixture's VllmConfig, with
    the overlay applied; ``prepare(request)`` first, where the CPU lacks something the layer's
    ``__init__`` calls."""

    def layer(request, site_id, dtype, seed):
        from vllm_overlap.testing import tiny_models
        from vllm_overlap.testing.layer_builders import SITE_LAYERS

        request.getfixturevalue("overlay_applied")
        if prepare:
            prepare(request)
        hf = getattr(tiny_models, config)()
        return SITE_LAYERS[site_id].build(request.getfixturevalue(vllm), hf, dtype, "cpu", seed), hf

    return layer


def _gdn(request, site_id, dtype, seed):
    from vllm_overlap.testing.tiny_models import qwen3_next_config

    return request.getfixturevalue("gdn_layer")(dtype=dtype, seed=seed), qwen3_next_config(2)


def _deepseek(request):
    from deepseek_layers import deepseek_v32_config

    return request.getfixturevalue("deepseek_vllm"), request.getfixturevalue("standins"), deepseek_v32_config()


def _indexer(request, site_id, dtype, seed):
    from deepseek_layers import build_indexer

    vllm_config, standins, hf = _deepseek(request)
    return build_indexer(vllm_config, hf, standins=standins, seed=seed, dtype=dtype), hf


def _v32_attention(request, site_id, dtype, seed):
    from deepseek_layers import build_v32_attention

    vllm_config, standins, hf = _deepseek(request)
    return build_v32_attention(vllm_config, hf, True, standins=standins, dtype=dtype, seed=seed), hf


def _mla_wrapper(request, site_id, dtype, seed):
    """The MLA wrapper; its entry gets what ``MultiHeadLatentAttentionWrapper.forward`` hands
    the site: its q projection and (normed) q_c, positions, k_pe with its head axis, hidden
    states, q_c."""
    from deepseek_layers import build_mla_wrapper

    vllm_config, standins, hf = _deepseek(request)
    return build_mla_wrapper(vllm_config, hf, True, standins=standins, dtype=dtype, seed=seed), hf


def _no_triton_allocator(request):
    """OLMo Hybrid's GDN layer's ``__init__`` sets up Triton's allocator, which this CPU lacks
    (no Triton): that one call is stood in. What the site runs is real."""
    request.getfixturevalue("monkeypatch").setattr(
        "vllm.model_executor.layers.mamba.gdn.olmo_gdn_linear_attn.set_triton_allocator", lambda device: None
    )


def _topk_rows(args):
    return args[0].topk_indices_buffer[: args[5].shape[0]].clone()


def _clear_topk(args):
    args[0].topk_indices_buffer.fill_(-1)


def _skip_topk(args):
    args[0].skip_topk = True


def _set(attr, value):
    def unreach(args):
        setattr(args[0], attr, value)

    return unreach


CASES: dict[str, SiteCase] = {
    case.site_id: case
    for case in (
        SiteCase(
            "gdn_in_proj",
            _gdn,
            # tiny_models.qwen3_next_config: 2 key heads, 4 value heads, head dims 128;
            # qkvz: q and k per key head, v and z per value head; ba: b and a per value head
            widths=(2 * 2 * 128 + 2 * 4 * 128, 2 * 4),
        ),
        SiteCase(
            "deepseek_indexer_legacy",
            _indexer,
            # deepseek_layers.INDEXER_ATTRS: 4 index heads, index head dim 128; q: n_head *
            # head_dim; kw: wk (head_dim) fused with weights_proj (n_head); k: head_dim
            widths=(4 * 128, 128 + 4, 128),
            seed=1,
        ),
        SiteCase("deepseek_indexer_v32", _v32_attention, deactivate=_skip_topk),
        SiteCase("mla_q_b_proj_v32", _v32_attention, deactivate=_skip_topk),
        # the wrapper's indexer call fills the shared top-k buffer
        SiteCase("mla_q_b_proj_legacy", _mla_wrapper, effect=(_clear_topk, _topk_rows), deactivate=_skip_topk),
        SiteCase(
            "kv_a_proj_minicpm3",
            _tiny("minicpm3_config", vllm="minicpm3_vllm"),
            # tiny_models.minicpm3_config: q: heads * (qk_nope + qk_rope); latent: kv_lora + qk_rope
            widths=(4 * (32 + 32), 64 + 32),
        ),
        SiteCase("delta_in_proj_olmo_hybrid", _tiny("olmo_hybrid_config", prepare=_no_triton_allocator)),
        SiteCase(
            "delta_in_proj_bailing_moe_v3",
            _tiny("bailing_moe_v3_config"),
            unreach=_set("separate_b_proj", True),
            # tiny_models.bailing_moe_v3_config (4 heads of 32): qkvb: q, k, v (heads * head_dim
            # each) and beta (one per head); f and g: heads * head_dim
            widths=(3 * 4 * 32 + 4, 4 * 32, 4 * 32),
            heads=((2, 32),),  # g2: g_proj's output viewed as (heads, head_dim)
        ),
        # Kimi-Linear's GDN layer (low-rank gate) and MLA layer (full-rank q)
        SiteCase("delta_in_proj_kimi_gdn", _tiny("kimi_linear_config"), unreach=_set("use_full_rank_gate", True)),
        SiteCase("kv_a_proj_kimi_linear", _tiny("kimi_linear_config"), unreach=_set("q_lora_rank", 64)),
    )
}

OP_SITES = sorted(s.id for s in SITES.values() if s.dynamo == "op")
UNREACH_SITES = sorted(c.site_id for c in CASES.values() if c.unreach)
GATED_SITES = sorted(c.site_id for c in CASES.values() if c.deactivate)
TOKEN_COUNTS = [0, 1, 7, 256, 1025]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def test_every_site_has_a_case():
    """A site declared without a case (or a case for no declared site) fails here; every check
    below is parametrised over the cases."""
    assert set(CASES) == set(SITES)


def test_every_site_with_another_path_says_how_to_take_it():
    assert set(UNREACH_SITES) == {s.id for s in SITES.values() if s.reached_when}


@pytest.mark.parametrize("site_id", UNREACH_SITES)
def test_the_census_counts_a_layer_on_upstreams_other_path_as_not_reaching_the_site(
    request, deepseek_overlay, site_id, monkeypatch
):
    from vllm_overlap.runtime import census as site_census
    from vllm_overlap.runtime import reports as census

    monkeypatch.setattr(census, "site_reports", {})
    case = CASES[site_id]
    reached = case.args(request, 1)[0]
    other = case.args(request, 1, seed=1)
    case.unreach(other)
    row = site_census.post_load(torch.nn.ModuleList([reached, other[0]]))[site_id]
    needs = SITES[site_id].reached_when
    assert (row["layers"], row["overlap"]) == (2, 1)
    assert row["serial"] == {f"not reached: upstream's forward takes another path here (the site needs {needs})": 1}


def test_every_gated_site_says_how_to_deactivate_its_layer():
    gated = {s.id for s in SITES.values() if any(form.active for form in s.forms)}
    assert set(GATED_SITES) == gated

# ---------------------------------------------------------------------------------------------
# Running a site
# ---------------------------------------------------------------------------------------------


def _fresh(args) -> tuple:
    """The arguments with new tensors (a branch may rotate an input in place, as upstream's
    RoPE does), so every run starts from the same values."""
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def _run(fn, site_id, args):
    """``fn(*args)`` on fresh arguments, with the site's layer-state effect appended."""
    args = _fresh(args)
    reset, observe = CASES[site_id].effect or (None, None)
    if reset:
        reset(args)
    with torch.no_grad():
        result = fn(*args)
    return (result, observe(args)) if observe else result


def _serial(site_id):
    rt = site_runtime(site_id)
    return lambda *args: rt.site.result(*rt.serial(*args))


def _perturbed(value):
    if isinstance(value, torch.Tensor):
        return value * 1.01 + 0.01
    if isinstance(value, tuple):
        return tuple(_perturbed(v) for v in value)
    return value


def _own(sites: list[str], site_id: str) -> list[str]:
    """The forks of ``site_id`` (a site's branch may call a layer with a site of its own: the
    MLA wrapper's indexer call runs the legacy indexer's)."""
    return [s for s in sites if s == site_id]


def _forked_sites(fake_gpu) -> list[str]:
    """The site of each fork ``fake_gpu`` recorded, from the events it was handed."""
    site_of = {id(pair[0]): key[0] for key, pair in streams._events.items()}
    return [site_of[id(event0)] for event0, *_ in fake_gpu]


@pytest.fixture
def forks(monkeypatch):
    """The site of every call of the stream primitive (the pair's or the fan-out's)."""
    calls = []
    for name in ("run_pair", "run_many"):
        real = getattr(streams, name)
        monkeypatch.setattr(streams, name, lambda site, *a, real=real: calls.append(site) or real(site, *a))
    return calls


@pytest.fixture
def token_range():
    """``token_range(feature, lo, hi)``: load a config with that feature's range (restored)."""
    before = active_config.loaded()

    def narrow(feature, lo, hi):
        data = OverlayConfig().model_dump()
        data["features"][feature].update(min_tokens=lo, max_tokens=hi)
        active_config.set_loaded(LoadedConfig(OverlayConfig.model_validate(data), "harness"))

    yield narrow
    active_config.set_loaded(before)


# ---------------------------------------------------------------------------------------------
# Every site
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tokens", [1, 7])
@pytest.mark.parametrize("site_id", sorted(CASES))
def test_overlapped_path_equals_the_serial_statements(request, deepseek_overlay, site_id, tokens, forks):
    args = CASES[site_id].args(request, tokens)
    expected = _run(_serial(site_id), site_id, args)
    actual = _run(site_entry(site_id), site_id, args)
    assert _own(forks, site_id) == [site_id]
    assert same_tensors(expected, actual) and tensors_of(expected)


BRANCHES = [(s.id, which) for s in SITES.values() for which in s.forms[0].branches]


@pytest.mark.parametrize("site_id, which", sorted(BRANCHES))
def test_a_perturbed_branch_changes_the_result(request, deepseek_overlay, site_id, which, monkeypatch):
    rt = site_runtime(site_id)
    args = CASES[site_id].args(request, 5)
    expected = _run(_serial(site_id), site_id, args)
    if rt.site.forms[rt.compiled.form_index].branches[which].returns == "None":
        # its effect is layer state: the mutation is not running it
        monkeypatch.setitem(rt.compiled.branches, which, lambda *a: None)
    else:
        wrap_branch(monkeypatch, site_id, which, _perturbed)
    assert not same_tensors(expected, _run(site_entry(site_id), site_id, args))


@pytest.mark.parametrize("tokens", [1, 7])
@pytest.mark.parametrize("site_id", sorted(CASES))
def test_branches_share_no_storage_that_either_writes(request, deepseek_overlay, site_id, tokens, recorder):
    args = CASES[site_id].args(request, tokens)
    expected = _run(_serial(site_id), site_id, args)
    actual = recorder.run(lambda: _run(site_entry(site_id), site_id, args))
    assert _own(recorder.forks, site_id) == [site_id]
    recorder.assert_no_cross_branch_hazard()  # nested sites' forks included
    assert same_tensors(expected, actual)


@pytest.mark.parametrize("site_id", sorted(CASES))
def test_the_first_run_hazard_check_passes_every_built_in_site(request, deepseek_overlay, site_id):
    """The check a user site's first run goes through (``runtime.hazards``), on each built-in
    site's real layer: no branch writes memory another uses, no collective; its results are
    the serial statements'."""
    from vllm_overlap.runtime.hazards import run_checked

    args = CASES[site_id].args(request, 5)
    rt = site_runtime(site_id)
    expected = _run(_serial(site_id), site_id, args)
    fresh = _fresh(args)
    reset, observe = CASES[site_id].effect or (None, None)
    if reset:
        reset(fresh)
    with torch.no_grad():
        branches = {w: (lambda fn=fn: fn(*fresh)) for w, fn in rt.compiled.branches.items()}
        results, finding = run_checked(branches, rt.compiled.order)
    assert finding is None
    actual = rt.site.result(*(results[w] for w in rt.compiled.branches))
    assert same_tensors(expected, (actual, observe(fresh)) if observe else actual)


def test_the_first_run_hazard_check_fails_a_branch_that_writes_an_input(request, deepseek_overlay):
    """Negative control on a real layer: GDN's aux branch made to write into the hidden states
    the current branch reads."""
    from vllm_overlap.runtime.hazards import run_checked

    layer, hidden = CASES["gdn_in_proj"].args(request, 5)
    rt = site_runtime("gdn_in_proj")
    branches = {
        "current": lambda: rt.compiled.branches["current"](layer, hidden),
        "aux": lambda: (rt.compiled.branches["aux"](layer, hidden), hidden.mul_(1)),
    }
    with torch.no_grad():
        _, finding = run_checked(branches, rt.compiled.order)
    assert finding == "the aux branch writes memory the current branch uses (1 storage(s))"


@pytest.mark.parametrize("site_id", sorted(CASES))
def test_no_second_stream_or_lora_runs_serially(request, deepseek_overlay, site_id, forks, monkeypatch):
    from vllm_overlap.runtime import gates

    rt = site_runtime(site_id)
    args = CASES[site_id].args(request, 3)
    expected = _run(_serial(site_id), site_id, args)
    with monkeypatch.context() as m:
        m.setattr(gates, "_OVERLAP_POSSIBLE", False)
        assert same_tensors(expected, _run(site_entry(site_id), site_id, args))
    projections = rt.compiled.projections(*args)
    assert projections  # the branches call modules of the layer
    for projection in projections:  # each one LoRA-wrapped alone
        with monkeypatch.context() as m:
            m.setattr(projection, "base_layer", torch.nn.Identity(), raising=False)
            assert same_tensors(expected, _run(site_entry(site_id), site_id, args))
    assert _own(forks, site_id) == []


@pytest.mark.parametrize("site_id", sorted(CASES))
def test_a_projection_that_is_not_stream_safe_runs_serially(request, deepseek_overlay, site_id, fake_gpu, monkeypatch):
    """Each module the branches call judged not stream-safe in turn (its kernel keeps a
    per-device workspace): upstream's statements, no fork; and the census says why."""
    from vllm_overlap.runtime import census as site_census
    from vllm_overlap.runtime import reports as census
    from vllm_overlap.runtime import stream_safety

    rt = site_runtime(site_id)
    args = CASES[site_id].args(request, 5)
    expected = _run(_serial(site_id), site_id, args)
    assert same_tensors(expected, _run(site_entry(site_id), site_id, args))
    assert _own(_forked_sites(fake_gpu), site_id) == [site_id]  # safe: it forks
    for projection in rt.compiled.projections(*args):
        fake_gpu.clear()
        with monkeypatch.context() as m:
            m.setitem(projection.__dict__, stream_safety.VERDICT, "TestKernel: a per-device workspace")
            assert same_tensors(expected, _run(site_entry(site_id), site_id, args))
            assert _own(_forked_sites(fake_gpu), site_id) == []
            m.setattr(census, "site_reports", {})
            row = site_census.post_load(torch.nn.ModuleList([args[0]]))[site_id]
            if projection in site_census.projections_of(rt, args[0]):
                assert row["serial"] == {"not stream-safe: TestKernel: a per-device workspace": 1}


CALLEE_SITES = sorted(s.id for s in SITES.values() if s.callees)


def test_the_mla_wrapper_site_declares_the_legacy_indexer_as_its_callee():
    assert CALLEE_SITES == ["mla_q_b_proj_legacy"]


@pytest.mark.parametrize("site_id", CALLEE_SITES)
def test_another_models_module_behind_a_callee_runs_serially(request, deepseek_overlay, site_id, fake_gpu, monkeypatch):
    """A model that builds the layer around a module of its own (Glm5Next wraps its own
    indexer in the MLA wrapper): upstream's statements, no fork, and the census says why."""
    from vllm_overlap.runtime import census as site_census
    from vllm_overlap.runtime import reports as census

    rt = site_runtime(site_id)
    args = CASES[site_id].args(request, 5)
    expected = _run(_serial(site_id), site_id, args)
    fake_gpu.clear()
    assert same_tensors(expected, _run(site_entry(site_id), site_id, args))
    assert _own(_forked_sites(fake_gpu), site_id) == [site_id]  # the declared class: it forks
    for callee in rt.site.callees:
        obj = args[0]
        for part in callee.expr.split(".")[1:]:
            obj = getattr(obj, part)

        class OtherModelsModule(type(obj)):  # same layout, a forward of its own
            def forward(self, *a, **k):
                return super().forward(*a, **k)

        monkeypatch.setattr(obj, "__class__", OtherModelsModule)
    fake_gpu.clear()
    assert same_tensors(expected, _run(site_entry(site_id), site_id, args))
    assert _own(_forked_sites(fake_gpu), site_id) == []
    monkeypatch.setattr(census, "site_reports", {})
    row = site_census.post_load(torch.nn.ModuleList([args[0]]))[site_id]
    callee = rt.site.callees[0]
    assert row["serial"] == {
        f"calls OtherModelsModule, not {callee.module}.{callee.qualname}: not proven": 1
    }


@pytest.mark.parametrize("site_id", GATED_SITES)
def test_an_inactive_layer_runs_only_the_ungated_branch(request, deepseek_overlay, site_id, forks, monkeypatch):
    rt = site_runtime(site_id)
    gated = rt.compiled.gated
    assert gated in rt.compiled.branches
    args = CASES[site_id].args(request, 4)
    CASES[site_id].deactivate(args)
    monkeypatch.setitem(rt.compiled.branches, gated, lambda *a: pytest.fail(f"the gated {gated} branch ran"))
    with torch.no_grad():
        fresh = _fresh(args)
        alone = {w: fn(*fresh) for w, fn in rt.compiled.branches.items() if w != gated}
    expected = rt.site.result(*(alone.get(w) for w in rt.compiled.branches))
    if CASES[site_id].effect:  # the layer state stays as reset: the gated branch wrote it
        reset, observe = CASES[site_id].effect
        reset(args)
        expected = (expected, observe(args))
    actual = _run(site_entry(site_id), site_id, args)
    assert _own(forks, site_id) == []
    assert same_tensors(expected, actual) and tensors_of(expected)


@pytest.mark.parametrize(
    "site_id, active",
    [(s, True) for s in sorted(CASES)] + [(s, False) for s in GATED_SITES],
)
def test_the_census_counts_the_sites_layer(request, deepseek_overlay, site_id, active, monkeypatch):
    """Every site has a census row for a model holding its layer: the layer overlaps, or (made
    inactive) runs serially with upstream's condition named as the reason."""
    from vllm_overlap.runtime import census as site_census
    from vllm_overlap.runtime import reports as census

    monkeypatch.setattr(census, "site_reports", {})
    args = CASES[site_id].args(request, 1)
    if not active:
        CASES[site_id].deactivate(args)
    rows = site_census.post_load(torch.nn.ModuleList([args[0]]))
    site = SITES[site_id]
    serial = {}
    if not active:
        form = site.forms[site_runtime(site_id).compiled.form_index]
        serial = {f"inactive: not ({form.active})": 1}
    assert rows[site_id] == {
        "feature": site.feature,
        "mode": "dual_stream",
        "layers": 1,
        "overlap": int(active),
        "serial": serial,
    }
    assert census.site_reports == rows


@pytest.mark.parametrize("tokens, forked", [(3, False), (4, True), (16, True), (17, False)])
@pytest.mark.parametrize("site_id", sorted(CASES))
def test_the_sites_token_range_gates_the_fork_at_both_bounds(
    request, deepseek_overlay, site_id, tokens, forked, fake_gpu, token_range
):
    token_range(SITES[site_id].feature, 4, 16)
    args = CASES[site_id].args(request, tokens)
    expected = _run(_serial(site_id), site_id, args)
    assert same_tensors(expected, _run(site_entry(site_id), site_id, args))
    assert _own(_forked_sites(fake_gpu), site_id) == [site_id] * forked


@pytest.mark.parametrize("site_id", sorted(CASES))
def test_micro_batch_threads_run_serially(request, deepseek_overlay, site_id, fake_gpu, monkeypatch):
    monkeypatch.setattr(streams, "in_micro_batch_thread", lambda: True)
    args = CASES[site_id].args(request, 8)
    expected = _run(_serial(site_id), site_id, args)
    assert same_tensors(expected, _run(site_entry(site_id), site_id, args))
    assert fake_gpu == []


# ---------------------------------------------------------------------------------------------
# Op sites: the generated custom op, its fake kernel, and torch.compile
# ---------------------------------------------------------------------------------------------


def _op(site_id):
    rt = site_runtime(site_id)
    return rt, getattr(torch.ops.vllm_overlap, rt.site.op)


def test_op_sites_are_the_declared_ones():
    """Every op site's case gives its output widths, and only op sites' cases do."""
    assert OP_SITES and OP_SITES == sorted(c.site_id for c in CASES.values() if c.widths)


@pytest.mark.parametrize("site_id", OP_SITES)
def test_op_widths_are_the_per_rank_output_sizes(request, deepseek_overlay, site_id):
    rt, _ = _op(site_id)
    assert rt.widths(CASES[site_id].args(request, 1)[0]) == CASES[site_id].widths


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("tokens", TOKEN_COUNTS)
@pytest.mark.parametrize("site_id", OP_SITES)
def test_opcheck(request, deepseek_overlay, site_id, tokens, dtype):
    rt, op = _op(site_id)
    args = CASES[site_id].args(request, tokens, dtype)
    torch.library.opcheck(op.default, rt.op_args(*args))


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("tokens", TOKEN_COUNTS)
@pytest.mark.parametrize("site_id", OP_SITES)
def test_fake_kernel_matches_real_outputs(request, deepseek_overlay, site_id, tokens, dtype):
    """Shapes, dtypes and strides of the fake kernel equal those of the real op, and the real
    outputs are the serial statements' results, contiguous."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    rt, op = _op(site_id)
    args = CASES[site_id].args(request, tokens, dtype)
    op_args = rt.op_args(*args)
    with torch.no_grad():
        real = op(*op_args)
        results = rt.serial(*args)
    with FakeTensorMode() as mode:
        fake = op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in op_args))
    assert len(real) == len(fake) == len(rt.site.outputs)
    for r, f, shape in zip(real, fake, CASES[site_id].shapes(tokens)):
        assert (tuple(f.shape), f.dtype, f.stride()) == (tuple(r.shape), r.dtype, r.stride())
        assert tuple(r.shape) == shape and r.dtype == dtype and r.is_contiguous()
    assert same_tensors(tuple(real), tuple(t.contiguous() for t in tensors_of(results)))


@pytest.mark.parametrize("site_id", OP_SITES)
def test_fake_kernel_keeps_a_symbolic_token_count(request, deepseek_overlay, site_id):
    from torch._dynamo.source import ConstantSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    rt, op = _op(site_id)
    args = CASES[site_id].args(request, 9)
    op_args = rt.op_args(*args)
    tensors = [a for a in op_args if isinstance(a, torch.Tensor)]
    with FakeTensorMode(shape_env=ShapeEnv()) as mode:
        ctx = StatelessSymbolicContext(
            dynamic_sizes=[DimDynamic.DYNAMIC] + [DimDynamic.STATIC] * (tensors[0].dim() - 1)
        )
        first = mode.from_tensor(tensors[0], symbolic_context=ctx, source=ConstantSource("x"))
        tokens = first.shape[0]
        assert isinstance(tokens, torch.SymInt)
        fakes = [first] + [mode.from_tensor(t).new_empty((tokens, *t.shape[1:])) for t in tensors[1:]]
        outs = op(*fakes, *op_args[len(tensors):])
    for out, shape in zip(outs, CASES[site_id].shapes(9)):
        assert str(out.shape[0]) == str(tokens)
        assert tuple(out.shape[1:]) == shape[1:] and out.is_contiguous()


@pytest.mark.parametrize("site_id", OP_SITES)
def test_real_op_refuses_an_output_the_fake_did_not_promise(request, deepseek_overlay, site_id):
    rt, op = _op(site_id)
    args = CASES[site_id].args(request, 3)  # the registry holds its layer weakly: keep it
    op_args = list(rt.op_args(*args))
    first_width = len(rt.site.params) - 1  # after the tensors: the widths, then head sizes
    for i in range(len(rt.site.outputs) + len(CASES[site_id].heads)):
        wrong = list(op_args)
        wrong[first_width + i] += 1
        with pytest.raises(RuntimeError, match="fake kernel promised"):
            op(*wrong)


@pytest.mark.parametrize("site_id", OP_SITES)
def test_unknown_layer_name_is_a_clear_error(request, deepseek_overlay, site_id):
    from vllm_overlap.runtime.layer_registry import encode_layer_name

    rt, op = _op(site_id)
    args = CASES[site_id].args(request, 2)
    op_args = list(rt.op_args(*args))
    op_args[-1] = encode_layer_name(rt.layer_name(args[0]) + ".nope")
    with pytest.raises(KeyError, match="no layer named"):
        op(*op_args)


class _Stack(torch.nn.Module):
    """N layers' sites called in sequence on the same inputs, as a decoder stack does."""

    def __init__(self, site_id, layers):
        super().__init__()
        self.site_id = site_id
        self.layers = torch.nn.ModuleList(layers)

    def forward(self, *tensors):
        entry = site_entry(self.site_id)
        sums = []
        for layer in self.layers:
            total = tensors[0].new_zeros((), dtype=torch.float32)
            for out in tensors_of(entry(layer, *tensors)):
                total = total + out.float().sum()
            sums.append(total)
        return torch.stack(sums)


def _compile_and_run(request, site_id, layers, token_counts):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    stack = _Stack(site_id, layers)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(stack, backend=counter, fullgraph=True, dynamic=True)
    for n in token_counts:
        tensors = CASES[site_id].args(request, n)[1:]
        with torch.no_grad():
            expected = stack(*tensors)
            torch.testing.assert_close(compiled(*tensors), expected, rtol=0, atol=0)
        # each layer has its own weights: an op given another layer's name would show
        assert len(set(expected.tolist())) == len(layers), expected
    return counter


def _layers(request, site_id, n):
    return [CASES[site_id].args(request, 1, seed=seed)[0] for seed in range(1, n + 1)]


@pytest.mark.parametrize("num_layers", [2, 4])
@pytest.mark.parametrize("site_id", OP_SITES)
def test_one_graph_for_any_number_of_layers_and_tokens(request, deepseek_overlay, site_id, num_layers):
    """fullgraph=True (no graph break), one graph for all token counts, one op per layer,
    each resolving its own layer."""
    rt, op = _op(site_id)
    counter = _compile_and_run(request, site_id, _layers(request, site_id, num_layers), [3, 7, 64])
    assert counter.frame_count == 1
    nodes = [n for n in counter.graphs[0].graph.nodes if n.target in (op, op.default)]
    assert len(nodes) == num_layers


@pytest.mark.parametrize("site_id", OP_SITES)
def test_layer_names_are_graph_inputs_not_constants(request, deepseek_overlay, site_id):
    """LayerName is hoisted: the graph's code names no layer, so every layer's slice of the
    graph is identical (a str name is baked in per layer: upstream's 4x cold-compile bug)."""
    import vllm.utils.torch_utils as tu

    if not getattr(tu, "_USE_LAYERNAME", False):
        pytest.skip("this vLLM/torch has no opaque LayerName; names are plain strings")
    rt, _ = _op(site_id)
    layers = _layers(request, site_id, 3)
    code = _compile_and_run(request, site_id, layers, [5]).graphs[0].code
    assert not any(rt.layer_name(layer) in code for layer in layers), code


@pytest.mark.parametrize("site_id", OP_SITES)
def test_str_layer_names_would_be_baked_in(request, deepseek_overlay, site_id, monkeypatch):
    """Negative control for the test above: with plain strings the names appear as constants."""
    from vllm_overlap.runtime import layer_registry as layer_names

    rt, _ = _op(site_id)
    layers = _layers(request, site_id, 2)
    monkeypatch.setattr(layer_names, "encode_layer_name", lambda name: name)
    try:
        counter = _compile_and_run(request, site_id, layers, [5])
    except Exception as exc:  # the op's schema may refuse a str where it wants LayerName
        pytest.skip(f"op schema does not take a str here: {type(exc).__name__}")
    assert all(rt.layer_name(layer) in counter.graphs[0].code for layer in layers)


# ---------------------------------------------------------------------------------------------
# Registry sites: the op finds a layer vLLM's forward context does not hold by name
# ---------------------------------------------------------------------------------------------

REGISTRY_SITES = sorted(s.id for s in SITES.values() if s.registry)


def test_registry_sites_are_op_sites():
    assert REGISTRY_SITES and set(REGISTRY_SITES) <= set(OP_SITES)


@pytest.mark.parametrize("site_id", REGISTRY_SITES)
def test_a_registry_sites_layer_registers_itself_when_built(request, deepseek_overlay, site_id, monkeypatch):
    """Whatever loader builds the model (and whether or not a post-load step runs), each
    instance is findable by its name as soon as it is built."""
    from vllm_overlap.runtime import layer_registry as layers

    monkeypatch.setattr(layers, "_layers", type(layers._layers)())
    layer = CASES[site_id].args(request, 1)[0]
    assert layers.registered_layers() == {site_runtime(site_id).layer_name(layer): layer}


@pytest.mark.parametrize("site_id", REGISTRY_SITES)
def test_an_unregistered_layer_is_traced_as_upstreams_statements(
    request, deepseek_overlay, site_id, monkeypatch, caplog
):
    """A layer the op could not find: the compiled graph runs upstream's statements for it
    (no op, no KeyError in the forward pass) and a warning names it."""
    from vllm_overlap.runtime import layer_registry as layers

    rt, op = _op(site_id)
    built = _layers(request, site_id, 2)
    monkeypatch.delitem(built[1].__dict__, layers.REGISTERED)
    monkeypatch.delitem(layers._layers, rt.layer_name(built[1]))
    with caplog.at_level("WARNING"):
        counter = _compile_and_run(request, site_id, built, [3, 7])
    # (tracing upstream's statements, Dynamo restarts once to make float attributes graph
    # inputs: that first attempt reaches the backend as an empty graph)
    graphs = [g for g in counter.graphs if len(g.graph.nodes)]
    assert len(graphs) == 1
    nodes = [n for n in graphs[0].graph.nodes if n.target in (op, op.default)]
    assert len(nodes) == 1  # the registered layer's op; the other runs upstream's statements
    assert f"layer {rt.layer_name(built[1])} is not in the overlay's registry" in caplog.text
