"""A user site at run time: the runtime built from its proof runs on the real layer, its first
run in the process is the hazard check (serial, recorded), and a finding turns the site off for
the process with the reason in the log; what the check finds (``runtime.hazards``).
"""

from __future__ import annotations

import importlib
import logging

import pytest
import torch

from conftest import minicpm3_user_site_yaml, same_tensors
from vllm_overlap import active_config, streams, user_sites
from vllm_overlap.config import LoadedConfig, parse_config
from vllm_overlap.runtime import hazards, installed

CONFIG = minicpm3_user_site_yaml("probe_q_kv")


@pytest.fixture
def user_runtime(overlay_applied, minicpm3_vllm):
    """The runtime of the config's user site, compiled from the installed MiniCPM3 forward,
    with that config loaded (restored after); and a real MiniCPM3 attention layer."""
    from vllm_overlap.site_layers import build_minicpm3_attention
    from vllm_overlap.tiny_models import minicpm3_config

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
