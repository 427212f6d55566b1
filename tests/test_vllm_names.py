"""Every vLLM name the runtime reads is declared with what happens without it, and doctor says
for the installed vLLM which are present."""

from __future__ import annotations

import ast
import os

import pytest
import torch

from vllm_overlap.runtime import vllm_names

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The modules that run inside vLLM's processes at serving time (not the CLI, benchmarks or the
# tiny-model builders, which need a full vLLM anyway).
RUNTIME_FILES = [
    "vllm_overlap/runtime/streams.py",
    "vllm_overlap/log.py",
    "vllm_overlap/runtime/hooks.py",
    "vllm_overlap/runtime/cache_key.py",
    "vllm_overlap/runtime/plugin.py",
    *(f"vllm_overlap/runtime/{f}" for f in sorted(os.listdir(os.path.join(ROOT, "vllm_overlap/runtime"))) if f.endswith(".py")),
]


def _imports() -> set[tuple[str, str]]:
    found = set()
    for path in RUNTIME_FILES:
        tree = ast.parse(open(os.path.join(ROOT, path), encoding="utf-8").read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vllm."):
                found |= {(node.module, alias.name) for alias in node.names}
    return found


def test_every_vllm_name_the_runtime_imports_is_declared():
    declared = {(n.module, n.name) for n in vllm_names.NAMES}
    imported = _imports()
    assert imported, "found no vLLM imports: the scan is wrong"
    assert imported <= declared, sorted(imported - declared)


def test_every_declared_name_is_present_in_the_installed_vllm():
    """Present, but a newer release's name (``since``) or one whose stand-in in its ``one_of``
    group is present (the compile-cache key: compute_hash here, compile_factors from 0.34)."""
    statuses = {r["name"]: r["status"] for r in vllm_names.report()}
    expected = {
        f"{n.module}.{n.name}": vllm_names.NOT_NEEDED if n.since or n.name.endswith("compile_factors") else "present"
        for n in vllm_names.NAMES
    }
    assert statuses == expected


def test_a_group_needs_one_of_its_names_and_says_so_when_none_is_there(monkeypatch):
    import vllm.config.vllm as cv

    monkeypatch.delattr(cv.VllmConfig, "compute_hash")
    statuses = {r["name"]: r["status"] for r in vllm_names.report()}
    for name in ("compute_hash", "compile_factors"):
        assert statuses[f"vllm.config.vllm.VllmConfig.{name}"].startswith("absent: the key goes into the other method")


def test_an_absent_name_says_what_the_runtime_does_instead(monkeypatch):
    missing = vllm_names.VllmName("vllm.utils.torch_utils", "no_such_name", "the fallback")
    assert vllm_names.look_up(missing) == "absent: the fallback"
    gone = vllm_names.VllmName("vllm.no_such_module", "x", "another fallback")
    assert vllm_names.look_up(gone) == "absent: another fallback"


def test_an_op_site_without_vllms_op_registration_is_skipped_with_the_reason(monkeypatch):
    import vllm.utils.torch_utils as torch_utils

    from vllm_overlap.engine.rewrite import RewriteSkipped
    from vllm_overlap.runtime import site_runtime

    monkeypatch.delattr(torch_utils, "direct_register_custom_op")
    with pytest.raises(RewriteSkipped, match="no vllm.utils.torch_utils.direct_register_custom_op"):
        site_runtime.register_op("vllm_overlap_test_never_registered", lambda: None, lambda: None)


def test_no_platform_module_means_no_second_stream(monkeypatch):
    import builtins

    from vllm_overlap.runtime import gates

    real = builtins.__import__

    def no_platforms(name, *args, **kwargs):
        if name == "vllm.platforms":
            raise ImportError(name)
        return real(name, *args, **kwargs)

    before = gates.set_overlap_possible(None)
    try:
        monkeypatch.setattr(builtins, "__import__", no_platforms)
        assert gates.overlap_possible() is False
    finally:
        gates.set_overlap_possible(before)


def test_after_loading_the_engine_logs_each_absent_name_with_its_fallback_once(monkeypatch, caplog):
    import logging

    import vllm.v1.worker.ubatching as ubatching

    from vllm_overlap.runtime import census as site_census

    monkeypatch.delattr(ubatching, "dbo_enabled")
    monkeypatch.setattr(vllm_names, "_said", False)
    with caplog.at_level(logging.WARNING):
        site_census.post_load(torch.nn.Module())
        site_census.post_load(torch.nn.Module())  # a second model in the process: said already
    said = [r.getMessage() for r in caplog.records if "this vLLM has no" in r.getMessage()]
    assert said == [
        "vllm-overlap: this vLLM has no vllm.v1.worker.ubatching.dbo_enabled: no dual-batch "
        "overlap in this vLLM: none to detect"
    ]
