"""The overlay's settings enter vLLM's compile-cache key (unit level; e2e in test_e2e)."""

from __future__ import annotations

from vllm_overlap.config.loader import parse_config
from vllm_overlap.runtime.cache_key import combine, overlay_key


def _key(text):
    return overlay_key(parse_config(text, "x"))


def test_key_follows_features_and_modes_not_token_ranges():
    on = _key("")
    assert on == _key("features: {gdn_in_proj: {max_tokens: 64, min_tokens: 2}}")
    assert on != _key("features: {gdn_in_proj: {mode: fused}}")
    assert on != _key("features: {deepseek_indexer: {enabled: false}}")
    from vllm_overlap.sites import FEATURES

    off = "features: {" + ", ".join(f"{name}: {{enabled: false}}" for name in FEATURES) + "}"
    assert _key(off) == ""
    assert _key(off.replace("kv_a_proj: {enabled: false}", "kv_a_proj: {enabled: true}")) != ""


def test_key_follows_user_sites_declarations_not_their_token_ranges():
    from conftest import minicpm3_user_site_yaml

    user = minicpm3_user_site_yaml("probe")
    without = _key(user.split("sites:", 1)[0])
    assert _key(user) != without  # a user site changes the traced code
    assert "    max_tokens: 512\n" in user and "    why: MiniCPM3's" in user
    retuned = user.replace("    max_tokens: 512\n", "    max_tokens: 64\n").replace("    why: MiniCPM3's", "    why: faster, MiniCPM3's")
    assert _key(user) == _key(retuned)
    assert _key(user) != _key(user.replace("      q, _ = self.q_b_proj(q)\n", ""))  # another declaration
    assert _key(user) != _key(user.replace("probe", "other"))
    assert _key(user + "    enabled: false\n") == without


def test_combine_keeps_vllms_hash_when_off_and_changes_it_when_on():
    h = "0123456789abcdef0123"
    assert combine(h, "") == h
    mixed = combine(h, _key(""))
    assert mixed != h and len(mixed) == len(h) and combine(h, _key("")) == mixed
    assert combine(h, _key("features: {gdn_in_proj: {mode: fused}}")) != mixed


def test_installed_vllm_config_hash_carries_the_key(overlay_applied, vllm_context):
    """In this process the plugin registered with defaults: compute_hash is wrapped."""
    wrapped = vllm_context.compute_hash()
    unwrapped = type(vllm_context).compute_hash.__wrapped__(vllm_context)
    assert wrapped == combine(unwrapped, _key("")) != unwrapped
