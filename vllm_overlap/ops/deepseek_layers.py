"""After loading a DeepSeek model: make the legacy indexers findable, and say per feature how
many of the model's MLA layers have an indexer to overlap with.

Runs once per model, from the post-load hook, for ``deepseek_indexer`` and ``mla_q_b_proj``.

- Registration: the legacy ``Indexer`` is not an attention layer, so vLLM's forward
  context does not hold it; the ``deepseek_indexer`` op finds it by ``LayerName`` (its
  prefix) in the overlay's weak registry instead. It must be registered here, at load time:
  a compiled graph is traced once, for the first layer, and then serves them all.
- Census: DeepSeek-V3/R1 (MLA without an indexer) and the V3.2 layers that reuse an
  earlier layer's top-k have nothing to overlap; both features run upstream's statements
  there. One INFO line says so, and ``state.post_load_reports`` keeps the counts.
"""

from __future__ import annotations

import sys

import torch

from .. import state
from ..plugin import logger
from . import register_layer

FEATURES = ("deepseek_indexer", "mla_q_b_proj")
NO_INDEXER = "no indexer"

V32_CLASS = ("vllm.models.deepseek_v32.attention", "DeepseekV32Attention")
WRAPPER_CLASS = ("vllm.model_executor.layers.mla", "MultiHeadLatentAttentionWrapper")
INDEXER_CLASS = ("vllm.model_executor.models.deepseek_v2", "Indexer")


def _loaded_class(module: str, name: str):
    """The class if its module is imported already (a model that uses it imported it)."""
    mod = sys.modules.get(module)
    return getattr(mod, name, None) if mod is not None else None


def mla_layers(model: torch.nn.Module) -> list[tuple[torch.nn.Module, bool]]:
    """(layer, has an active indexer) for every MLA attention layer of either code shape."""
    from .deepseek_indexer import has_active_indexer as v32_active
    from .mla_q_b_proj import wrapper_has_active_indexer as wrapper_active

    candidates = (
        (_loaded_class(*V32_CLASS), v32_active),
        (_loaded_class(*WRAPPER_CLASS), wrapper_active),
    )
    shapes = [(cls, check) for cls, check in candidates if cls is not None]
    found = []
    for module in model.modules():
        for cls, check in shapes:
            if isinstance(module, cls):
                found.append((module, check(module)))
                break
    return found


def register_indexers(model: torch.nn.Module) -> int:
    cls = _loaded_class(*INDEXER_CLASS)
    count = 0
    for module in model.modules() if cls is not None else ():
        if isinstance(module, cls):
            register_layer(module.prefix, module)
            count += 1
    return count


def post_load(model: torch.nn.Module) -> dict:
    """Register the legacy indexers; report, log and return the census."""
    layers = mla_layers(model)
    active = sum(1 for _, has in layers if has)
    report = {
        "mla_layers": len(layers),
        "with_indexer": active,
        "serial": {NO_INDEXER: len(layers) - active} if len(layers) > active else {},
        "registered_indexers": register_indexers(model),
    }
    if not layers:  # not a DeepSeek model: nothing to say
        return report
    for name in FEATURES:
        if state.feature_config(name).enabled:
            state.post_load_reports[name] = report
    logger().info(
        "vllm-overlap deepseek: %d of %d MLA layers have an indexer to overlap with%s",
        active,
        len(layers),
        f"; {len(layers) - active} run upstream's statements: {NO_INDEXER}"
        if len(layers) > active
        else "",
    )
    return report
