"""The overlay's settings enter vLLM's compile-cache key (unit level; e2e in test_e2e)."""

from __future__ import annotations

from vllm_overlap.cache_key import combine, overlay_key
from vllm_overlap.config import parse_config


def _key(text):
    return overlay_key(parse_config(text, "x"))


def test_key_follows_features_and_modes_not_token_ranges():
    on = _key("")
    assert on == _key("features: {gdn_in_proj: {max_tokens: 64, min_tokens: 2}}")
    assert on != _key("features: {gdn_in_proj: {mode: fused}}")
    assert on != _key("features: {deepseek_indexer: {enabled: false}}")
    from vllm_overlap.patches import FEATURES

    off = "features: {" + ", ".join(f"{name}: {{enabled: false}}" for name in FEATURES) + "}"
    assert _key(off) == ""
    assert _key(off.replace("kv_a_proj: {enabled: false}", "kv_a_proj: {enabled: true}")) != ""


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
