"""A user site at run time: the runtime built from its proof runs on the real layer, its first
run in the process is the hazard check (serial, recorded), and a finding turns the site off for
the process with the reason in the log; what the check finds (``runtime.hazards``).
"""

from __future__ import annotations

import importlib
import logging
import textwrap

import pytest
import torch
from conftest import minicpm3_user_site_yaml, same_tensors

from vllm_overlap.config import active as active_config
from vllm_overlap.config.loader import LoadedConfig, parse_config
from vllm_overlap.engine import user_sites
from vllm_overlap.runtime import hazards
from vllm_overlap.runtime import module_namespaces as installed

CONFIG = minicpm3_user_site_yaml("probe_q_kv")


@pytest.fixture
def user_runtime(overlay_applied, minicpm3_vllm):
    """The runtime of the config's user site, compiled from the installed MiniCPM3 forward,
    with that config loaded (restored after); and a real MiniCPM3 attention layer."""
    from vllm_overlap.testing.layer_builders import build_minicpm3_attention
    from vllm_overlap.testing.tiny_models import minicpm3_config

    config = parse_config(CONFIG, "user.yaml")
    (cfg,) = config.sites
    importlib.import_module(cfg.module)
    proof = user_sites.prove(cfg, user_sites.read_module(cfg.module), "user.yaml")
    assert proof.site is not None, proof.refused
    before = active_config.loaded()
    active_config.set_loaded(LoadedConfig(config, "user.yaml"))
    layer = build_minicpm3_attention(minicpm3_vllm, minicpm3_config(), seed=2)
    try:
        yield installed.standalone(proof.site, proof.site.targets[0]), layer
    finally:
        active_config.set_loaded(before)


def _hidden(tokens=5):
    return torch.randn(tokens, 128, generator=torch.Generator().manual_seed(tokens)).to(torch.bfloat16)


def test_the_first_run_is_checked_then_the_site_forks(user_runtime, count_forks, caplog):
    rt, layer = user_runtime
    hidden = _hidden()
    with torch.no_grad():
        expected = rt.serial(layer, hidden)
        with caplog.at_level(logging.INFO):
            first = rt(layer, hidden)
        assert count_forks == []  # the check ran the branches serially, recorded
        second = rt(layer, hidden)
    assert count_forks == [("user_probe_q_kv", 5)]
    assert rt.off_reason == ""
    assert "vllm-overlap site user_probe_q_kv: first run checked: no shared memory written, no collective" in caplog.text
    assert same_tensors(first, expected) and same_tensors(second, expected)


def test_a_branch_that_writes_what_another_reads_turns_the_site_off(user_runtime, count_forks, caplog, monkeypatch):
    """A hazard the proof cannot see (here made by wrapping the aux branch to scale the layer's
    input in place): the first run finds it, the site is serial for the rest of the process."""
    rt, layer = user_runtime
    real = rt.compiled.branches["aux"]

    def aux_writing_its_input(self, hidden_states):
        out = real(self, hidden_states)
        hidden_states.mul_(1)  # same values, but a write into what the current branch reads
        return out

    monkeypatch.setitem(rt.compiled.branches, "aux", aux_writing_its_input)
    hidden = _hidden()
    with torch.no_grad(), caplog.at_level(logging.WARNING):
        expected = rt.serial(layer, hidden)
        first = rt(layer, hidden)
        later = [rt(layer, hidden) for _ in range(2)]
    assert rt.off_reason == "hazard check: the aux branch writes memory the current branch uses (1 storage(s))"
    assert f"vllm-overlap site user_probe_q_kv: off for this process: {rt.off_reason}" in caplog.text
    assert count_forks == []  # never forked
    assert all(same_tensors(out, expected) for out in [first, *later])


def test_an_unchecked_site_never_forks_during_a_capture(user_runtime, count_forks, monkeypatch):
    """Called first inside a CUDA-graph capture: serial, unchecked; the check waits for the
    first call outside a capture."""
    from vllm_overlap.runtime import site_runtime

    rt, layer = user_runtime
    hidden = _hidden()
    with torch.no_grad():
        expected = rt.serial(layer, hidden)
        monkeypatch.setattr(site_runtime, "_capturing", lambda: True)
        captured = rt(layer, hidden)
        assert rt._checked is False and count_forks == []
        monkeypatch.setattr(site_runtime, "_capturing", lambda: False)
        rt(layer, hidden)  # the check
        assert rt._checked is True and count_forks == []
        rt(layer, hidden)
    assert count_forks == [("user_probe_q_kv", 5)]
    assert same_tensors(captured, expected)


def test_the_check_finds_nothing_in_independent_branches_and_runs_them_in_order():
    x = torch.randn(4, 8)
    w0, w1 = torch.randn(8, 8), torch.randn(8, 3)
    ran = []
    results, finding = hazards.run_checked(
        {"current": lambda: ran.append("current") or x @ w0, "aux": lambda: ran.append("aux") or x @ w1},
        ("aux", "current"),
    )
    assert finding is None and ran == ["aux", "current"]
    assert torch.equal(results["aux"], x @ w1)


def test_the_check_finds_a_write_into_memory_another_branch_writes():
    out = torch.zeros(4, 8)
    x = torch.randn(4, 8)
    _, finding = hazards.run_checked(
        {"current": lambda: torch.add(x, 1, out=out), "aux": lambda: torch.mul(x, 2, out=out)}, ("current", "aux")
    )
    assert finding == "the current branch writes memory the aux branch uses (1 storage(s))"


def test_the_check_finds_a_collective():
    lib = torch.library.Library("vllm_overlap_test", "FRAGMENT")
    if not hasattr(torch.ops.vllm_overlap_test, "all_reduce"):
        lib.define("all_reduce(Tensor x) -> Tensor")
        lib.impl("all_reduce", lambda x: x.clone(), "CompositeExplicitAutograd")
    x = torch.randn(4, 8)
    _, finding = hazards.run_checked(
        {"current": lambda: x @ x.T, "aux": lambda: torch.ops.vllm_overlap_test.all_reduce(x)}, ("current", "aux")
    )
    assert finding == "the aux branch runs a collective (vllm_overlap_test::all_reduce)"
    assert not hazards.is_collective(torch.ops.aten.mm.default)


# ---------------------------------------------------------------------------------------------
# Issue 25: the check covers the moved statements, and runs again for every new combination of
# argument aliasing and shape class; fake kernels per input (synthetic layers, fake modules)
# ---------------------------------------------------------------------------------------------

SYNTHETIC = """\
import torch
from torch import nn
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import ColumnParallelLinear


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.a_proj = ColumnParallelLinear(8, 8)
        self.b_proj = ColumnParallelLinear(8, 4)
        self.norm = RMSNorm(8)

    def forward(self, x: torch.Tensor, y: torch.Tensor, residual: torch.Tensor):
        p, _ = self.a_proj(x)
        h, r = self.norm(x, residual)
        q, _ = self.b_proj(y)
        return p, q, h, r
"""


class _Proj(torch.nn.Module):
    def __init__(self, width: int, seed: int):
        super().__init__()
        self.output_size_per_partition = width
        self.weight = torch.randn(width, 8, generator=torch.Generator().manual_seed(seed))

    def forward(self, x):
        return x @ self.weight.T, None


class _InPlaceNorm(torch.nn.Module):
    """What vLLM's RMSNorm with a residual does on CUDA (fused_add_rms_norm): both in place."""

    def forward(self, x, residual):
        residual.add_(x)
        x.copy_(residual * 0.5)
        return x, residual


class _Layer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a_proj, self.b_proj, self.norm = _Proj(8, 1), _Proj(4, 2), _InPlaceNorm()


@pytest.fixture
def synthetic_runtime(monkeypatch):
    """A user site on SYNTHETIC proven statically, its runtime compiled from that source with
    the config loaded; and a layer of fake modules (what the runtime runs is upstream's text)."""
    from vllm_overlap.engine.branches import compile_form
    from vllm_overlap.runtime.site_runtime import SiteRuntime

    def make(site_id: str, current: str, aux: str, tokens: str = "x"):
        yaml = (
            f"sites:\n  - id: {site_id}\n    module: probe_synthetic\n    function: Layer.forward\n"
            f"    current: '{current}'\n    aux: ['{aux}']\n    tokens: {tokens}\n"
        )
        config = parse_config(yaml, "user.yaml")
        (cfg,) = config.sites
        proof = user_sites.prove(cfg, SYNTHETIC)
        assert proof.site is not None, proof.refused
        before = active_config.loaded()
        active_config.set_loaded(LoadedConfig(config, "user.yaml"))
        func_text = textwrap.dedent("    def forward" + SYNTHETIC.split("    def forward", 1)[1])
        compiled = compile_form(proof.site, 0, func_text, {"torch": torch}, "<synthetic>", 1)
        return SiteRuntime(compiled), proof, before

    made = []

    def factory(*args, **kw):
        made.append(make(*args, **kw))
        return made[-1][:2]

    yield factory
    for _, _, before in made:
        active_config.set_loaded(before)


def test_moved_statements_are_checked_again_for_each_new_aliasing(synthetic_runtime, count_forks, caplog):
    """The norm given a residual writes residual in place and moves after the aux group, which
    reads y: statically independent (other names), a hazard when y is residual. The first call
    (no aliasing) is checked and clean, the second forks, the third (y is residual: a new
    combination) is checked again, finds the hazard, and the site is off for the process with
    one log line; the moved statement ran on copies, never twice on the real tensors."""
    rt, proof = synthetic_runtime("probe_alias", "p, _ = self.a_proj(x)", "q, _ = self.b_proj(y)")
    assert proof.site.params == ("self", "x", "y", "residual")
    assert rt.compiled.region_pairs == (("moved statement `h, r = self.norm(x, residual)`", "aux"),)
    layer = _Layer()
    x, y, residual = (torch.randn(5, 8, generator=torch.Generator().manual_seed(s)) for s in (3, 4, 5))
    with torch.no_grad(), caplog.at_level(logging.INFO):
        rt.overlapped(layer, x, y, residual)
        assert count_forks == [] and rt.off_reason == ""
        rt.overlapped(layer, x, y, residual)
        assert count_forks == [("user_probe_alias", 5)]
        kept = residual.clone()
        shared = rt.overlapped(layer, x, residual, residual)
        assert torch.equal(residual, kept)
        assert same_tensors(shared, rt.serial(layer, x, residual, residual))
        later = [rt.overlapped(layer, x, residual, residual), rt.overlapped(layer, x, y, residual)]
    assert rt.off_reason == (
        "hazard check: the moved statement `h, r = self.norm(x, residual)` writes memory the aux branch uses (1 storage(s))"
    )
    assert caplog.text.count("off for this process") == 1
    assert count_forks == [("user_probe_alias", 5)]  # never again
    assert same_tensors(later[1], rt.serial(layer, x, y, residual))


def test_a_new_shape_class_is_checked_again(synthetic_runtime, count_forks):
    rt, _ = synthetic_runtime("probe_shapes", "p, _ = self.a_proj(x)", "q, _ = self.b_proj(y)")
    layer = _Layer()
    with torch.no_grad():
        for tokens in (5, 7, 1, 0, 9):
            x, y, residual = torch.randn(tokens, 8), torch.randn(tokens, 8), torch.randn(tokens, 8)
            rt.overlapped(layer, x, y, residual)
    assert len(rt._seen) == 3  # many tokens, one token, none
    assert [n for _, n in count_forks] == [7, 9]


def test_outputs_of_different_lengths_under_torch_compile(synthetic_runtime):
    """molmo2's q and merged_kv: each output's first dimension is its own input's. The op
    compiled (fullgraph) on inputs of 5 and 3 rows gives what the serial statements give."""
    from vllm_overlap.runtime import layer_registry as layers

    rt, proof = synthetic_runtime("probe_lengths", "p, _ = self.a_proj(x)", "q, _ = self.b_proj(y)")
    assert [(o.name, o.like) for o in proof.site.outputs] == [("p", "x"), ("q", "y")]
    layer = _Layer()
    layer.__dict__[user_sites.REGISTERED_NAME] = "user_probe_lengths.0"
    layers.register_layer("user_probe_lengths.0", layer)
    x, y, residual = torch.randn(5, 8), torch.randn(3, 8), torch.randn(5, 8)

    def run(x, y, residual):
        p, q = rt._unflatten(rt._op(*rt.op_args(layer, x, y, residual)))
        return p * 2, q.sum(0)

    with torch.no_grad():
        expected = rt.serial(layer, x, y, residual)
        got = torch.compile(run, fullgraph=True, backend="aot_eager")(x, y, residual)
    assert got[0].shape == (5, 8) and got[1].shape == (4,)
    assert torch.equal(got[0], expected[0] * 2) and torch.equal(got[1], expected[1].sum(0))
