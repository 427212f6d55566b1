"""After loading: the legacy indexers are registered by prefix, and the census counts the MLA
layers that have an indexer to overlap with (both code shapes), and those that do not."""

from __future__ import annotations

from torch import nn

from deepseek_layers import (
    build_mla_wrapper,
    build_v32_attention,
    deepseek_v3_config,
    deepseek_v32_config,
)


def test_census_and_registration(deepseek_vllm, standins, monkeypatch):
    from vllm_overlap import census
    from vllm_overlap.runtime import layers
    from vllm_overlap.runtime.deepseek_census import NO_INDEXER, post_load

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
    monkeypatch.setattr(layers, "_layers", type(layers._layers)())  # forget what the builders registered
    monkeypatch.setattr(census, "post_load_reports", {})

    report = post_load(model)

    assert report == {
        "mla_layers": 5,
        "with_indexer": 2,
        "serial": {NO_INDEXER: 3},
        "registered_indexers": 1,  # the legacy Indexer; the V3.2 path needs no lookup
    }
    assert layers.resolve_layer(with_indexer.indexer.prefix) is with_indexer.indexer
    assert census.post_load_reports == {"deepseek_indexer": report, "mla_q_b_proj": report}


def test_a_model_without_mla_layers_reports_nothing(monkeypatch):
    from vllm_overlap import census
    from vllm_overlap.runtime.deepseek_census import post_load

    monkeypatch.setattr(census, "post_load_reports", {})
    assert post_load(nn.Sequential(nn.Linear(2, 2)))["mla_layers"] == 0
    assert census.post_load_reports == {}
