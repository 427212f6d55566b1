"""The overlay's settings in vLLM's compile-cache key.

vLLM names its torch.compile cache (the AOT directory included) by a hash of its config plus
environment factors; the source files Dynamo traced are only checked when an artefact is
loaded, and all of them (vLLM's own files and our rewritten copy) still exist whichever way the
overlay is set. So without this, a run with a feature off could load a graph compiled with it on:
silent wrong code.

The key mixes in which features are enabled and their modes, and each enabled user site's
declaration: what decides the traced code. Token ranges are left out: they act at run time
inside the ops, never in the graph.

Where it goes is found by capability, not by version: every method of ``VllmConfig`` among
:data:`KEY_METHODS` that the installed vLLM defines is wrapped (``compute_hash`` up to 0.33,
``compile_factors`` from 0.34, which ``compilation/caching.py`` hashes). Where neither exists,
:func:`unkeyed_reason` says so, and every site whose traced code differs under torch.compile
is skipped with that reason (``plugin.apply_rewrite``).
"""

from __future__ import annotations

import hashlib
import importlib
import json

from vllm_overlap.config.loader import FEATURE_NAMES, OverlayConfig
from vllm_overlap.runtime import hooks

CONFIG_MODULE = "vllm.config.vllm"
CONFIG_CLASS = "VllmConfig"
# The methods vLLM keys its compile cache by, each with how the key is mixed into its result.
KEY_METHODS = ("compute_hash", "compile_factors")
FACTOR = "vllm_overlap"  # the overlay's entry in compile_factors()

_key = ""  # this process's key ("" when every feature is off)
_keyed_by: list[str] | None = None  # the methods wrapped; None until vLLM's config module is seen


def overlay_key(config: OverlayConfig) -> str:
    """'' when every feature is off (the hash stays vLLM's own), else a stable string."""
    enabled: dict = {
        name: config.feature(name).mode
        for name in FEATURE_NAMES
        if config.feature(name).enabled
    }
    for site in config.sites:  # a user site: its declaration decides the traced code
        if config.feature(site.feature_name).enabled:
            enabled[site.feature_name] = site.model_dump(exclude={"min_tokens", "max_tokens", "why"})
    return json.dumps(enabled, sort_keys=True) if enabled else ""


def combine(vllm_hash: str, key: str) -> str:
    """vLLM's hash with ``key`` mixed in, same length and alphabet."""
    if not key:
        return vllm_hash
    mixed = hashlib.sha256(f"{vllm_hash}|vllm-overlap|{key}".encode()).hexdigest()
    return mixed[: len(vllm_hash)] if len(vllm_hash) <= len(mixed) else mixed


def with_factor(factors: dict, key: str) -> dict:
    """vLLM's compile factors with the overlay's key as one more entry (a new dict)."""
    if not key:
        return factors
    if not isinstance(factors, dict):
        raise TypeError(f"{CONFIG_CLASS}.compile_factors() returned {type(factors).__name__}, not a dict")
    return {**factors, FACTOR: key}


def key_into(config_class: type, key: str) -> list[str]:
    """Wrap each of ``config_class``'s key methods so its result carries ``key``; the names
    of those it has (empty: none, the cache cannot be keyed)."""
    mixers = {
        "compute_hash": lambda result, instance, args, kwargs: combine(result, key),
        "compile_factors": lambda result, instance, args, kwargs: with_factor(result, key),
    }
    return [
        name
        for name in KEY_METHODS
        if hooks.wrap(config_class, name, after=mixers[name], what=f"the compile-cache key ({CONFIG_CLASS}.{name})")
    ]


def _on_config_module(module) -> None:
    global _keyed_by
    config_class = getattr(module, CONFIG_CLASS, None)
    _keyed_by = key_into(config_class, _key) if isinstance(config_class, type) else []


def install(config: OverlayConfig) -> None:
    """Mix this config's key into vLLM's compile-cache key once vLLM's config module is imported."""
    global _key, _keyed_by
    _key, _keyed_by = overlay_key(config), None
    if _key:
        hooks.on_import(CONFIG_MODULE, _on_config_module, what="the compile-cache key")


def unkeyed_reason() -> str | None:
    """None where vLLM's compile cache carries the overlay's key (or needs none), else why not;
    imports vLLM's config module if nothing has yet (its hook then runs)."""
    if not _key:
        return None
    if _keyed_by is None:
        try:
            importlib.import_module(CONFIG_MODULE)
        except Exception as exc:
            return f"no compile-cache key: {CONFIG_MODULE} does not import ({type(exc).__name__}: {exc})"
    if _keyed_by is None:
        return f"no compile-cache key: the hook on {CONFIG_MODULE} did not run"
    if not _keyed_by:
        return (
            f"no compile-cache key: this vLLM's {CONFIG_CLASS} has none of {', '.join(KEY_METHODS)}, "
            "so a graph compiled with a site on could be loaded with it off: every site whose "
            "traced code differs under torch.compile is skipped"
        )
    return None


def keyed_nowhere() -> bool:
    """Whether vLLM's config module was seen and offered no method to key the cache by."""
    return bool(_key) and _keyed_by == []


def describe() -> str:
    """Doctor's and the log's word on the key in this process."""
    if not _key:
        return "not needed (every feature off)"
    if _keyed_by is None:
        return f"pending (mixed in when {CONFIG_MODULE} is imported)"
    if not _keyed_by:
        return unkeyed_reason() or ""
    return "mixed into " + ", ".join(f"{CONFIG_CLASS}.{name}()" for name in _keyed_by)
