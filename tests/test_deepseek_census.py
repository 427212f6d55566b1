"""The legacy indexers are registered by prefix as they are built; after loading, the site census counts per site
the layers that overlap and names why the others do not, and the DeepSeek census counts the
MLA layers that have an indexer to overlap with (both code shapes), and those that do not."""

from __future__ import annotations

from deepseek_layers import (
    build_mla_wrapper,
    build_v32_attention,
    deepseek_v3_config,
    deepseek_v32_config,
)
from torch import nn

from vllm_overlap.sites import FEATURES

# what the plugin passes the DeepSeek features' shared post-load step
DEEPSEEK = (FEATURES["deepseek_indexer"], FEATURES["mla_q_b_proj"])


def test_census_and_registration(deepseek_vllm, standins, monkeypatch):
    from vllm_overlap.runtime import census as site_census
    from vllm_overlap.runtime import layer_registry as layers
    from vllm_overlap.runtime import reports as census
    from vllm_overlap.runtime.deepseek_post_load import NO_INDEXER, post_load

    monkeypatch.setattr(layers, "_layers", type(layers._layers)())  # only what is built here
    v32 = deepseek_v32_config()
    with_indexer = build_mla_wrapper(deepseek_vllm, v32, True, standins=standins)
    model = nn.ModuleList(
        [
            with_indexer,
            build_mla_wrapper(deepseek_vllm, deepseek_v3_config(), False, standins=standins),
            build_v32_attention(deepseek_vllm, v32, True, standins=standins),
            build_v32_attention(deepseek_vllm, v32, False, standins=standins),
        ]
    )
    skipping = build_v32_attention(deepseek_vllm, v32, True, standins=standins)
    skipping.skip_topk = True  # reuses an earlier layer's top-k: nothing to overlap
    model.append(skipping)
    monkeypatch.setattr(census, "post_load_reports", {})
    monkeypatch.setattr(census, "site_reports", {})

    sites = site_census.post_load(model)
    report = post_load(model, DEEPSEEK)

    assert report == {"mla_layers": 5, "with_indexer": 2, "serial": {NO_INDEXER: 3}}
    assert census.post_load_reports == {"deepseek_indexer": report, "mla_q_b_proj": report}
    # the legacy Indexer registered itself by its prefix when built; the V3.2 path needs no lookup
    assert list(layers.registered_layers()) == [with_indexer.indexer.prefix]
    assert layers.resolve_layer(with_indexer.indexer.prefix) is with_indexer.indexer

    v32_inactive = {"inactive: not (self.indexer is not None and not self.skip_topk)": 2}
    legacy_inactive = {"inactive: not (self.indexer and self.is_sparse and not self.skip_topk)": 1}
    row = {"mode": "dual_stream"}
    assert sites == {
        # the wrappers: one with an indexer, the DeepSeek-V3 one without
        "mla_q_b_proj_legacy": {**row, "feature": "mla_q_b_proj", "layers": 2, "overlap": 1, "serial": legacy_inactive},
        # the one legacy Indexer, inside the first wrapper
        "deepseek_indexer_legacy": {**row, "feature": "deepseek_indexer", "layers": 1, "overlap": 1, "serial": {}},
        # the V3.2 layers: with an indexer, without one, and one that skips its top-k
        "deepseek_indexer_v32": {**row, "feature": "deepseek_indexer", "layers": 3, "overlap": 1, "serial": v32_inactive},
        "mla_q_b_proj_v32": {**row, "feature": "mla_q_b_proj", "layers": 3, "overlap": 1, "serial": v32_inactive},
    }
    assert census.site_reports == sites


def test_a_disabled_feature_has_no_census_rows(deepseek_vllm, standins, monkeypatch):
    from vllm_overlap.config import active as active_config
    from vllm_overlap.config.loader import LoadedConfig, OverlayConfig
    from vllm_overlap.runtime import census as site_census
    from vllm_overlap.runtime import reports as census

    data = OverlayConfig().model_dump()
    data["features"]["mla_q_b_proj"]["enabled"] = False
    off = OverlayConfig.model_validate(data)
    monkeypatch.setattr(active_config, "_loaded", LoadedConfig(off, "test"))
    monkeypatch.setattr(census, "site_reports", {})
    layer = build_v32_attention(deepseek_vllm, deepseek_v32_config(), True, standins=standins)
    assert sorted(site_census.post_load(layer)) == ["deepseek_indexer_v32"]


def test_a_model_without_mla_layers_reports_nothing(monkeypatch):
    from vllm_overlap.runtime import census as site_census
    from vllm_overlap.runtime import reports as census
    from vllm_overlap.runtime.deepseek_post_load import post_load

    monkeypatch.setattr(census, "post_load_reports", {})
    monkeypatch.setattr(census, "site_reports", {})
    model = nn.Sequential(nn.Linear(2, 2))
    assert post_load(model, DEEPSEEK)["mla_layers"] == 0 and site_census.post_load(model) == {}
    assert census.post_load_reports == {} and census.site_reports == {}
