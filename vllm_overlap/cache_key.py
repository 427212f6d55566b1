"""The overlay's settings in vLLM's compile-cache key.

vLLM names its torch.compile cache (the AOT directory included) by ``VllmConfig.compute_hash()``
plus environment factors; the source files Dynamo traced are only checked when an artefact is
loaded, and all of them (vLLM's own files and our rewritten copy) still exist whichever way the
overlay is set. So without this, a run with a feature off could load a graph compiled with it on.

The key mixes in which features are enabled and their modes, and each enabled user site's
declaration: what decides the traced code.
Token ranges are left out: they act at run time inside the ops, never in the graph.
"""

from __future__ import annotations

import hashlib
import json

import wrapt

from .config import FEATURE_NAMES, OverlayConfig

CONFIG_MODULE = "vllm.config.vllm"


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


def install(config: OverlayConfig) -> None:
    """Wrap ``VllmConfig.compute_hash`` once vLLM's config module is imported."""
    key = overlay_key(config)
    if not key:
        return

    def wrapper(wrapped, instance, args, kwargs):
        return combine(wrapped(*args, **kwargs), key)

    def hook(module) -> None:
        wrapt.wrap_function_wrapper(module, "VllmConfig.compute_hash", wrapper)

    wrapt.register_post_import_hook(hook, CONFIG_MODULE)
