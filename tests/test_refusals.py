"""Declared refusals (``Site.refused_inside``, ``runtime.refusals``): a site's layer inside a
class the site refuses runs upstream's statements, and the census names the refusal.

The one declared today: ``deepseek_indexer_legacy`` inside Dots3Note's full-attention layer,
which calls DeepSeek's legacy ``Indexer`` from its own forward. Dots3Note's module imports
only with CUDA flash-attention, so the mechanism test puts a module of that name in
``sys.modules`` holding a class of that name around a real ``Indexer``: the refusal is
resolved by name from what the process has imported, as for the real class on a GPU.
"""

from __future__ import annotations

import ast
import os
import sys
import types

import torch
from conftest import functions
from deepseek_layers import (
    INDEXER_TARGET,
    build_indexer,
    build_indexer_rope,
    deepseek_v32_config,
    identical,
    make_inputs,
    run_indexer,
)

from vllm_overlap.sites import SITES

SITE = SITES["deepseek_indexer_legacy"]
(DOTS3,) = SITE.refused_inside


def _source_tree(module: str) -> ast.Module:
    """The installed module's syntax tree, read without importing its package (Dots3Note's
    package imports CUDA flash-attention)."""
    import vllm

    path = os.path.join(os.path.dirname(vllm.__file__), *module.split(".")[1:]) + ".py"
    with open(path) as fh:
        return ast.parse(fh.read())


def test_the_declared_refusal_names_a_class_that_reaches_the_legacy_indexer():
    """Dots3NoteFullAttention exists in the installed vLLM, is a DeepseekV2MLAAttention (so
    it holds a legacy Indexer), and its module calls ``<attention>.indexer(...)``."""
    tree = _source_tree(DOTS3.module)
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    assert DOTS3.qualname in classes
    bases = [ast.unparse(b) for b in classes[DOTS3.qualname].bases]
    assert bases == ["DeepseekV2MLAAttention"]
    calls = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "indexer"
    ]
    assert calls, "Dots3Note no longer calls an indexer: drop the refusal"
    assert "Indexer" in DOTS3.reason and "GPU" in DOTS3.reason




def _model_with_a_refused_and_a_free_indexer(deepseek_vllm, standins, monkeypatch):
    module = types.ModuleType(DOTS3.module)

    class Owner(torch.nn.Module):  # stands for Dots3NoteFullAttention: holds the Indexer
        def __init__(self, indexer):
            super().__init__()
            self.indexer = indexer

    Owner.__name__ = Owner.__qualname__ = DOTS3.qualname
    setattr(module, DOTS3.qualname, Owner)
    monkeypatch.setitem(sys.modules, DOTS3.module, module)
    hf = deepseek_v32_config()
    refused = build_indexer(deepseek_vllm, hf, standins=standins, seed=1)
    free = build_indexer(deepseek_vllm, hf, standins=standins, seed=2)
    model = torch.nn.ModuleDict({"full": Owner(refused), "other": free})
    return model, refused, free, hf


def test_an_indexer_inside_the_refused_class_runs_upstream_statements(
    deepseek_vllm, standins, count_forks, monkeypatch
):
    from vllm_overlap.runtime import census as site_census
    from vllm_overlap.runtime import reports as census

    monkeypatch.setattr(census, "site_reports", {})
    model, refused, free, hf = _model_with_a_refused_and_a_free_indexer(deepseek_vllm, standins, monkeypatch)
    rows = site_census.post_load(model)
    assert rows[SITE.id] == {
        "feature": "deepseek_indexer",
        "mode": "dual_stream",
        "layers": 2,
        "overlap": 1,
        "serial": {f"inside {DOTS3.qualname}: {DOTS3.reason}": 1},
    }

    upstream, rewritten = functions(INDEXER_TARGET)
    rope = build_indexer_rope(hf)
    positions, hidden, qr = make_inputs(hf, 7)
    for indexer, forked in ((refused, []), (free, [(SITE.id, 7)])):
        count_forks.clear()
        expected = run_indexer(upstream, indexer, hidden, qr, positions, rope)
        assert count_forks == []
        actual = run_indexer(rewritten, indexer, hidden, qr, positions, rope)
        assert count_forks == forked
        assert identical(expected, actual)


def test_without_the_refused_class_imported_nothing_is_marked(deepseek_vllm, standins, monkeypatch):
    from vllm_overlap.runtime import census as site_census
    from vllm_overlap.runtime import refusals

    model, refused, free, _ = _model_with_a_refused_and_a_free_indexer(deepseek_vllm, standins, monkeypatch)
    monkeypatch.delitem(sys.modules, DOTS3.module)
    site_census.mark_refusals(model)
    assert refusals.reason(refused, SITE.id) == "" and refusals.reason(free, SITE.id) == ""
