"""Config: the shipped files, the environment switches, and every kind of bad input."""

from __future__ import annotations

import glob
import os

import pytest

from vllm_overlap.config import (
    FEATURE_NAMES,
    ConfigError,
    FeatureConfig,
    FeaturesConfig,
    OverlayConfig,
    load_config,
    load_config_file,
    parse_config,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


def test_shipped_configs_exist():
    names = {os.path.basename(p) for p in CONFIGS}
    assert {"default.yaml", "qwen3-next.yaml", "deepseek-v32.yaml", "off.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_shipped_config_validates(path):
    assert isinstance(load_config_file(path), OverlayConfig)


def test_default_yaml_is_the_built_in_default():
    assert load_config_file(os.path.join(ROOT, "configs", "default.yaml")) == OverlayConfig()


OFF_YAML = os.path.join(ROOT, "configs", "off.yaml")


def test_off_yaml_turns_every_feature_of_the_registry_off():
    from vllm_overlap.patches import FEATURES

    cfg = load_config_file(OFF_YAML)
    assert set(FEATURE_NAMES) == set(FEATURES)  # every feature has its config entry
    assert not any(cfg.feature(name).enabled for name in FEATURES)
    assert cfg == load_config({"VLLM_OVERLAP": "0"}).config
    assert cfg.fingerprint() == load_config({"VLLM_OVERLAP": "0"}).config.fingerprint()


def test_off_yaml_stays_off_when_a_feature_is_added():
    """A later version's config with one more feature, on by default, reading today's file."""
    import yaml

    class LaterFeatures(FeaturesConfig):
        later_site: FeatureConfig = FeatureConfig()

    class LaterConfig(OverlayConfig):
        features: LaterFeatures = LaterFeatures()

    with open(OFF_YAML, encoding="utf-8") as fh:
        off = LaterConfig.model_validate(yaml.safe_load(fh))
    assert LaterConfig().feature("later_site").enabled  # on unless the file says otherwise
    assert not off.feature("later_site").enabled
    assert not any(off.feature(name).enabled for name in (*FEATURE_NAMES, "later_site"))


def test_the_overlay_switch_keeps_feature_settings_but_turns_them_off():
    cfg = parse_config("enabled: false\nfeatures: {gdn_in_proj: {max_tokens: 64}}", "x")
    assert cfg.features.gdn_in_proj.max_tokens == 64 and cfg.features.gdn_in_proj.enabled
    assert not cfg.feature("gdn_in_proj").enabled and cfg.feature("gdn_in_proj").max_tokens == 64


def test_environment_selects_the_source(tmp_path):
    assert load_config({}).source == "built-in defaults"
    off = load_config({"VLLM_OVERLAP": "0"})
    assert off.source == "VLLM_OVERLAP=0" and not off.config.feature("gdn_in_proj").enabled
    path = tmp_path / "c.yaml"
    path.write_text("features: {gdn_in_proj: {max_tokens: 64}}\n")
    loaded = load_config({"VLLM_OVERLAP_CONFIG": str(path)})
    assert loaded.source == str(path) and loaded.config.features.gdn_in_proj.max_tokens == 64
    # VLLM_OVERLAP=0 wins over a config file
    assert load_config({"VLLM_OVERLAP": "0", "VLLM_OVERLAP_CONFIG": str(path)}).source == "VLLM_OVERLAP=0"


@pytest.mark.parametrize(
    "text, fragments",
    [
        ("features: {gdn_in_proj: {enabled: true", ["bad.yaml", "YAML syntax error", "line 1"]),
        ("features: {gdn_in_proj: {speed: 3}}", ["bad.yaml", "features.gdn_in_proj.speed", "3"]),
        ("stric: true", ["bad.yaml", "unknown key 'stric'", "True"]),
        ("features: {gdn_in_proj: {max_tokens: many}}", ["bad.yaml", "features.gdn_in_proj.max_tokens", "'many'"]),
        ("features: {gdn_in_proj: {enabled: 'yes'}}", ["bad.yaml", "features.gdn_in_proj.enabled", "'yes'"]),
        ("strict: 1", ["bad.yaml", "strict", "1"]),
        ("enabled: 'off'", ["bad.yaml", "enabled", "'off'"]),
        (
            "features: {mla_q_b_proj: {min_tokens: 2048, max_tokens: 1024}}",
            ["bad.yaml", "features.mla_q_b_proj", "min_tokens (2048)", "max_tokens (1024)"],
        ),
        ("features: {gdn_in_proj: {mode: turbo}}", ["bad.yaml", "features.gdn_in_proj.mode", "'turbo'"]),
        ("features: {deepseek_indexer: {mode: fused}}", ["bad.yaml", "features.deepseek_indexer.mode", "'fused'"]),
        ("features: {gdn_in_proj: {min_tokens: -1}}", ["bad.yaml", "features.gdn_in_proj.min_tokens", "-1"]),
        ("- just a list", ["bad.yaml", "mapping"]),
    ],
)
def test_bad_input_names_file_key_and_value(text, fragments):
    with pytest.raises(ConfigError) as info:
        parse_config(text, "bad.yaml")
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    assert "\n" not in message and "Traceback" not in message


def test_missing_file_names_the_file_and_the_variable(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError) as info:
        load_config({"VLLM_OVERLAP_CONFIG": missing})
    assert missing in str(info.value) and "VLLM_OVERLAP_CONFIG" in str(info.value)


def test_bad_switch_value():
    with pytest.raises(ConfigError, match="VLLM_OVERLAP = 'maybe'"):
        load_config({"VLLM_OVERLAP": "maybe"})


def test_config_error_stops_like_systemexit():
    assert issubclass(ConfigError, SystemExit)
    assert ConfigError("x").code == "vllm-overlap: x"


def test_fingerprint_changes_with_settings():
    a = OverlayConfig()
    b = parse_config("features: {gdn_in_proj: {mode: fused}}", "x")
    assert a.fingerprint() != b.fingerprint() and a.fingerprint() == OverlayConfig().fingerprint()


def test_token_range_is_inclusive():
    cfg = parse_config("features: {gdn_in_proj: {min_tokens: 2, max_tokens: 8}}", "x").features.gdn_in_proj
    assert [cfg.overlaps(n) for n in (1, 2, 8, 9)] == [False, True, True, False]
