"""The registry is the one source: every declared site is sound, and the config, doctor,
docs/sites.md, patches/ and compat all carry exactly the declared features and sites."""

from __future__ import annotations

import os

import pytest
from conftest import ROOT

from vllm_overlap.sites import FEATURES, SITES, problems


def test_every_declaration_is_sound():
    assert problems() == []


def test_a_broken_declaration_is_reported():
    """The control: each kind of mistake the check exists for is found."""
    import dataclasses

    from vllm_overlap.engine.site import Facts

    site = SITES["gdn_in_proj"]
    no_fact = dataclasses.replace(site, facts=dataclasses.replace(site.facts, upstream=" "))
    assert any("no 'Upstream' fact" in p for p in no_fact.problems())
    wrong_entry = dataclasses.replace(site, entry="other")
    assert any("expected one call of __site__.other" in p for p in wrong_entry.problems())
    short = dataclasses.replace(site, outputs=site.outputs[:1])
    assert any("1 outputs declared, branches return 2" in p for p in short.problems())
    assert isinstance(site.facts, Facts)


def test_config_keys_are_the_features():
    from vllm_overlap.config.loader import FEATURE_NAMES, OverlayConfig

    assert FEATURE_NAMES == tuple(FEATURES)
    for name, feature in FEATURES.items():
        assert OverlayConfig().feature(name).mode == "dual_stream"
        field = type(OverlayConfig().feature(name)).model_fields["mode"]
        assert set(field.annotation.__args__) == set(feature.modes)


def test_sites_page_block_is_the_registry():
    from vllm_overlap.cli.readme import PAGE, block, render

    with open(os.path.join(ROOT, PAGE), encoding="utf-8") as fh:
        text = fh.read()
    assert block(text) == render()
    for site in SITES.values():
        assert f"#### {site.id}" in text


def test_patches_has_a_diff_per_feature():
    names = sorted(f[: -len(".diff")] for f in os.listdir(os.path.join(ROOT, "patches")))
    assert names == sorted(FEATURES)


@pytest.mark.parametrize("site_id", list(SITES))
def test_doctor_has_a_row_per_target_of_each_site(site_id, deepseek_overlay):
    import importlib.util

    from vllm_overlap.cli.doctor import collect

    site = SITES[site_id]
    report = collect()
    rows = {(r["feature"], r["module"], r["target"]) for r in report["rows"]}
    import ast

    from vllm_overlap.engine.sources import find_function, read_installed

    for target in site.targets:
        if importlib.util.find_spec(target.module) is None:  # another release's module
            assert f"{site.feature} {target}: module {target.module} not in this vLLM" in report["absent"]
        elif find_function(ast.parse(read_installed(target.module)), target.qualname) is None:
            owner = target.qualname.split(".")[0]  # another release's class in this module
            assert f"{site.feature} {target}: {target.module} has no {owner}" in report["absent"]
        else:
            assert (site.feature, target.module, target.qualname) in rows


def test_compat_has_a_row_per_target_of_each_site():
    """Over the installed vLLM's sources (what compat reads out of each release's wheel)."""
    import importlib.util

    from vllm_overlap.cli.compat import release_rows

    def read(module):
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            raise ModuleNotFoundError(module)
        with open(spec.origin, encoding="utf-8") as fh:
            return fh.read()

    rows = {(r["feature"], r["target"]): r["result"] for r in release_rows("installed", read)}
    for site in SITES.values():
        for target in site.targets:
            assert (site.feature, target.qualname) in rows, (site.id, target)
    assert rows[("gdn_in_proj", "QwenGatedDeltaNetAttention.forward_cuda")] == "applies"
