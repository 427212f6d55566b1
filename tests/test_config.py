"""Config: the shipped files, the environment switches, and every kind of bad input."""

from __future__ import annotations

import glob
import os

import pytest

from vllm_overlap.config.loader import (
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
    from vllm_overlap.sites import FEATURES

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


# --------------------------------------------------------------------------- hostile input
# Each case stops with one line naming the file and the key (or line), never a traceback, a
# hang or a silently different value. Cases that could hang or exhaust memory run in a child
# process under a time limit.

import subprocess  # noqa: E402
import sys  # noqa: E402


def _child_load(env_value: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """``load_config()`` in a fresh process with VLLM_OVERLAP_CONFIG=env_value, as vLLM's
    plugin loader would call it; killed (and the test failed) if it does not finish in time."""
    env = {k: v for k, v in os.environ.items() if k != "VLLM_OVERLAP"}
    env["VLLM_OVERLAP_CONFIG"] = env_value
    program = (
        "import resource\n"
        "resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))\n"
        "from vllm_overlap.config.loader import load_config\n"
        "load_config()\n"
    )
    try:
        return subprocess.run(
            [sys.executable, "-c", program], env=env, cwd=ROOT, capture_output=True, text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"loading the config {env_value!r} did not finish in {timeout} s")


def _one_line_stop(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    err = proc.stderr.strip()
    assert proc.returncode == 1, (proc.returncode, err[-2000:])
    assert "Traceback" not in err and "\n" not in err, err[-2000:]
    assert err.startswith("vllm-overlap: config "), err
    for fragment in fragments:
        assert fragment in err, err
    return err


def _error(text: str | bytes, tmp_path, name: str = "c.yaml") -> str:
    path = tmp_path / name
    if isinstance(text, str):
        text = text.encode()
    path.write_bytes(text)
    with pytest.raises(ConfigError) as info:
        load_config_file(str(path))
    message = str(info.value)
    assert message.startswith(f"vllm-overlap: config {path}: "), message
    assert "\n" not in message and "Traceback" not in message
    return message


def test_invalid_utf8_names_the_byte_offset(tmp_path):
    message = _error(b"strict: false\n# caf\xe9\n", tmp_path)
    assert "not UTF-8" in message and "offset 19" in message and "line 2" in message


def test_deep_nesting_is_refused(tmp_path):
    deep = "features: " + "[" * 5000 + "]" * 5000 + "\n"
    assert "nested deeper than" in _error(deep, tmp_path)
    deep_map = "strict: " + "{a: " * 200 + "1" + "}" * 200 + "\n"
    message = _error(deep_map, tmp_path)
    assert "nested deeper than" in message and "strict.a.a" in message


def test_nesting_through_aliases_counts_too(tmp_path):
    text = "x: &a [[[[[[[[[[1]]]]]]]]]]\n"
    for i, prev in zip("bcdef", "abcde"):
        text += f"{i}: &{i} [[[[[[[[[[*{prev}]]]]]]]]]]\n"
    assert "nested deeper than" in _error(text, tmp_path)


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path):
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    _one_line_stop(_child_load(str(fifo), timeout=30), str(fifo), "not a regular file", "FIFO")


def test_a_directory_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="not a regular file .a directory."):
        load_config_file(str(tmp_path))


def test_an_endless_device_is_refused(tmp_path):
    _one_line_stop(_child_load("/dev/zero", timeout=30), "/dev/zero", "not a regular file")


def test_a_file_over_the_size_bound_is_refused(tmp_path):
    big = "strict: false\n" + "#" * (1 << 20) + "\n"
    assert "larger than 1 MiB" in _error(big, tmp_path)


def test_a_symlinked_config_file_is_read(tmp_path):
    real = tmp_path / "real.yaml"
    real.write_text("features: {gdn_in_proj: {max_tokens: 64}}\n")
    (tmp_path / "link.yaml").symlink_to(real)
    assert load_config_file(str(tmp_path / "link.yaml")).features.gdn_in_proj.max_tokens == 64


ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
    for p, c in zip("abcdefgh", "bcdefghi")
)


def test_an_alias_bomb_stops_quickly(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(ALIAS_BOMB)
    _one_line_stop(_child_load(str(path), timeout=60), str(path), "alias")


def test_aliases_within_the_bound_are_read(tmp_path):
    text = "features:\n  gdn_in_proj: &r {min_tokens: 2, max_tokens: 64}\n  mla_q_b_proj: *r\n"
    cfg = parse_config(text, "x")
    assert cfg.features.mla_q_b_proj.max_tokens == 64 and cfg.features.gdn_in_proj.min_tokens == 2


def test_a_recursive_alias_is_refused(tmp_path):
    assert "recursive alias" in _error("strict: &a [*a]\n", tmp_path)


@pytest.mark.parametrize(
    "text, fragments",
    [
        (
            "features:\n  gdn_in_proj: {enabled: false}\n  gdn_in_proj: {max_tokens: 64}\n",
            ["features: duplicate key 'gdn_in_proj' (lines 2 and 3)"],
        ),
        ("strict: true\nstrict: false\n", ["<top level>: duplicate key 'strict' (lines 1 and 2)"]),
        (
            "features: {gdn_in_proj: {enabled: false, 'enabled': true}}\n",
            ["features.gdn_in_proj: duplicate key 'enabled'"],
        ),
    ],
)
def test_duplicate_keys_are_refused(tmp_path, text, fragments):
    message = _error(text, tmp_path)
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize(
    "text, fragments",
    [
        # YAML 1.1 octal: 8 there, 10 in YAML 1.2; refused either way
        ("features: {gdn_in_proj: {max_tokens: 010}}", ["features.gdn_in_proj.max_tokens", "010", "leading zero"]),
        ("features: {gdn_in_proj: {max_tokens: !!int 010}}", ["features.gdn_in_proj.max_tokens", "leading zero"]),
        # YAML 1.1 base 60 (90) and digit separators (1024): strings in YAML 1.2
        ("features: {gdn_in_proj: {max_tokens: 1:30}}", ["features.gdn_in_proj.max_tokens", "'1:30'", "YAML 1.2"]),
        ("features: {gdn_in_proj: {max_tokens: 1_024}}", ["features.gdn_in_proj.max_tokens", "'1_024'", "YAML 1.2"]),
        # YAML 1.1 booleans: strings in YAML 1.2
        ("features: {gdn_in_proj: {enabled: yes}}", ["features.gdn_in_proj.enabled", "'yes'", "true or false"]),
        ("enabled: off", ["enabled", "'off'", "true or false"]),
        ("strict: on", ["strict", "'on'", "true or false"]),
        ("features: {gdn_in_proj: {enabled: n}}", ["features.gdn_in_proj.enabled", "'n'"]),
        ("strict: !!bool yes", ["strict", "!!bool", "'yes'"]),
        ("<<: {strict: true}", ["<<", "merge"]),
        ("strict: !!binary aGVsbG8=", ["strict", "!!binary"]),
        ("? [a, b]\n: 1\n", ["<top level>", "key"]),
    ],
)
def test_yaml_1_1_forms_are_refused(tmp_path, text, fragments):
    message = _error(text, tmp_path)
    for fragment in fragments:
        assert fragment in message, message


def test_yaml_1_2_core_forms_are_read():
    text = (
        "enabled: TRUE\nstrict: False\nfeatures: {gdn_in_proj: {min_tokens: 0o20, max_tokens: 0x40},"
        " mla_q_b_proj: {min_tokens: 0, max_tokens: +100}}\n"
    )
    cfg = parse_config(text, "x")
    assert cfg.enabled is True and cfg.strict is False
    assert (cfg.features.gdn_in_proj.min_tokens, cfg.features.gdn_in_proj.max_tokens) == (16, 64)
    assert cfg.features.mla_q_b_proj.max_tokens == 100


@pytest.mark.parametrize(
    "value, fragment",
    [
        ("1" * 38, "integer too large"),
        ("9" * 5000, "integer too large"),
        (str(2**31), "less than or equal to 2147483647"),
    ],
)
def test_integers_beyond_the_bound_are_refused(tmp_path, value, fragment):
    message = _error(f"features: {{gdn_in_proj: {{max_tokens: {value}}}}}\n", tmp_path)
    assert "features.gdn_in_proj.max_tokens" in message and fragment in message, message
    assert len(message) < 400, message


def test_the_largest_token_bound_is_read():
    text = f"features: {{gdn_in_proj: {{max_tokens: {2**31 - 1}}}}}"
    assert parse_config(text, "x").features.gdn_in_proj.max_tokens == 2**31 - 1


@pytest.mark.parametrize("blank", ["", "   ", "\t\n"])
def test_a_blank_config_variable_is_an_error_not_the_defaults(blank):
    with pytest.raises(ConfigError, match="VLLM_OVERLAP_CONFIG is set but blank"):
        load_config({"VLLM_OVERLAP_CONFIG": blank})


def test_a_long_bad_value_is_cut_in_the_message(tmp_path):
    message = _error("stric: [" + ", ".join(["word"] * 5000) + "]\n", tmp_path)
    assert "unknown key 'stric'" in message and len(message) < 400, message


def test_a_worst_case_file_within_the_size_bound_is_read_in_bounded_time(tmp_path):
    """Just under 1 MiB of the slowest things to scan: a long comment and a long string."""
    path = tmp_path / "slow.yaml"
    filler = (1 << 20) - 200
    path.write_text("# " + "x" * (filler // 2) + "\nsites: []\nx: '" + "y" * (filler // 2) + "'\n")
    import time

    start = time.monotonic()
    proc = _child_load(str(path), timeout=60)
    _one_line_stop(proc, "unknown key 'x'")
    assert time.monotonic() - start < 30


def test_reading_past_the_time_bound_is_one_error(tmp_path, monkeypatch):
    """The YAML loop looks at the clock every CHECK_EVERY events and objects (the first
    included): with no time at all, even the smallest file stops, with one line."""
    from vllm_overlap.config import yaml_reader

    monkeypatch.setattr(yaml_reader, "MAX_SECONDS", 0)
    path = tmp_path / "overlap.yaml"
    path.write_text("enabled: true\n")
    with pytest.raises(ConfigError) as err:
        load_config_file(str(path))
    assert str(err.value) == f"vllm-overlap: config {path}: reading took longer than 0 s"


def test_the_time_bound_is_checked_every_few_hundred_steps(monkeypatch):
    """A clock that moves one second per look: the 10 s deadline passes at the tenth look,
    after 10 * CHECK_EVERY steps. A document of fewer steps is read; a longer one stops."""
    import itertools

    from vllm_overlap.config import yaml_reader

    assert yaml_reader.MAX_SECONDS == 10 and 100 <= yaml_reader.CHECK_EVERY <= 1000
    looks = []

    ticks = itertools.count()

    def clock():
        looks.append(next(ticks))
        return looks[-1]

    monkeypatch.setattr(yaml_reader, "_clock", clock)
    short = "strict: [" + ", ".join(["x"] * 500) + "]\n"  # about 1,000 steps
    assert yaml_reader.load(short)["strict"] == ["x"] * 500
    assert 2 <= len(looks) <= 1 + 1100 // yaml_reader.CHECK_EVERY + 1
    looks.clear()
    long = "strict: [" + ", ".join(["x"] * 5000) + "]\n"  # about 10,000 steps
    with pytest.raises(ConfigError) as err:
        parse_config(long, "long.yaml")
    assert str(err.value) == "vllm-overlap: config long.yaml: reading took longer than 10 s"
    assert len(looks) == 11  # the deadline's own look, then ten
