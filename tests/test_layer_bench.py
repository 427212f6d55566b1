"""The layer benchmark and calibrate measure every site a model's layers run, GDN and DeepSeek,
through the site declarations and ``site_layers`` (timings are printed by the benchmark, never
asserted here)."""

from __future__ import annotations

import pytest

from vllm_overlap.cli.calibrate import plan
from vllm_overlap.sites import SITES
from vllm_overlap.testing.layer_bench import measure_model, measured_sites
from vllm_overlap.testing.layer_builders import SITE_LAYERS

# DeepSeek-V3 plus the lightning indexer: vLLM reads such a config as V3.2.
V32_OVERRIDES = {"index_topk": 16, "index_n_heads": 4, "index_head_dim": 128}
NEWER = "deepseek_indexer is timed at a newer site of this vLLM"
ENGINE_ONLY = SITE_LAYERS["mla_q_b_proj_legacy"].unmeasured


def test_every_site_declares_how_to_build_its_layer():
    assert set(SITE_LAYERS) == set(SITES)


def _shape(results):
    return {site: (why if isinstance(why, str) else [r["tokens"] for r in why]) for site, why in results.items()}


def test_a_qwen3_next_model_measures_gdn_in_proj(deepseek_overlay, model_dirs):
    results, where = measure_model(model_dirs(2), token_counts=(1, 4), reps=3)
    assert _shape(results) == {"gdn_in_proj": [1, 4]} and where == "CPU (serial path)"


def test_a_deepseek_v32_model_measures_its_sites_and_says_why_not_the_others(deepseek_overlay, deepseek_v3_dir):
    results, _ = measure_model(deepseek_v3_dir, token_counts=(1, 4), reps=3, hf_overrides=V32_OVERRIDES)
    assert _shape(results) == {
        "deepseek_indexer_v32": [1, 4],
        "deepseek_indexer_legacy": "deepseek_indexer is timed at a newer site of this vLLM",
        "mla_q_b_proj_v32": [1, 4],
        "mla_q_b_proj_legacy": ENGINE_ONLY,
    }
    rows = results["mla_q_b_proj_v32"]
    assert all(r["off_us"] > 0 and r["on_us"] > 0 for r in rows)


def test_a_deepseek_v3_model_without_an_indexer_has_no_site(deepseek_overlay, deepseek_v3_dir):
    from vllm_overlap.testing.layer_bench import standalone_vllm

    with standalone_vllm(deepseek_v3_dir) as vllm_config:
        assert measured_sites(vllm_config.model_config.hf_text_config) == []


@pytest.mark.parametrize("timed", [True, False])
def test_calibrate_keeps_a_range_per_measured_feature(timed):
    fast = [{"tokens": 1, "on/off": 0.8}, {"tokens": 8, "on/off": 0.9}, {"tokens": 64, "on/off": 1.1}]
    results = {
        "deepseek_indexer_v32": fast if timed else "why not",
        "deepseek_indexer_legacy": NEWER,
        "mla_q_b_proj_v32": [{"tokens": 1, "on/off": 1.2}],
        "mla_q_b_proj_legacy": ENGINE_ONLY,
    }
    ranges, lines = plan(results, margin=0.02, reps=5)
    expected = {"mla_q_b_proj": None}
    if timed:
        expected["deepseek_indexer"] = (1, 8)
    assert ranges == expected
    assert f"# mla_q_b_proj_legacy (mla_q_b_proj): not measured: {ENGINE_ONLY}" in lines
    assert ("#       8 tokens: on/off 0.900" in lines) == timed


def test_tp_scaling_divides_head_counts_in_attributes_and_in_dict_attributes():
    """Per-rank shapes: a head count held in a dict attribute (Kimi's linear_attn_config) is
    divided too, the caller's config left as it was; an indivisible count is refused."""
    from types import SimpleNamespace

    from vllm_overlap.testing.layer_builders import scaled_for_tp

    config = SimpleNamespace(num_attention_heads=8, linear_attn_config={"num_heads": 4, "head_dim": 32})
    scaled = scaled_for_tp(config, 2, ("num_attention_heads", "linear_attn_config.num_heads"))
    assert scaled.num_attention_heads == 4 and scaled.linear_attn_config == {"num_heads": 2, "head_dim": 32}
    assert config.linear_attn_config["num_heads"] == 4
    with pytest.raises(ValueError, match="linear_attn_config.num_heads=4 is not divisible by tensor parallel size 8"):
        scaled_for_tp(config, 8, ("linear_attn_config.num_heads",))
