"""After loading a DeepSeek model: make the legacy indexers findable, and say per feature how
many of the model's MLA layers have an indexer to overlap with.

Runs once per model, from the post-load hook, for ``deepseek_indexer`` and ``mla_q_b_proj``.

- Registration: the legacy ``Indexer`` is not an attention layer, so vLLM's forward
  context does not hold it; the ``deepseek_indexer`` op finds it by ``LayerName`` (its
  prefix) in the overlay's weak registry instead. It must be registered here, at load time:
  a compiled graph is traced once, for the first layer, and then serves them all.
- Census: DeepSeek-V3/R1 (MLA without an indexer) and the V3.2 layers that reuse an
  earlier layer's top-k have nothing to overlap; both features run upstream's statements
  there. One INFO line says so, and ``census.post_load_reports`` keeps the counts.
"""

from __future__ import annotations

import sys

import torch

from .. import active_config, census
from ..log import logger
from . import installed
from .layers import register_layer

FEATURES = ("deepseek_indexer", "mla_q_b_proj")
NO_INDEXER = "no indexer"

# The sites whose targets are MLA attention layers; their gates say which have an indexer.
MLA_SITES = ("mla_q_b_proj_v32", "mla_q_b_proj_legacy", "deepseek_indexer_v32")


def _classes(site_id: str):
    """(class, runtime) of each target of ``site_id`` rewritten in this process."""
    from ..patches import SITES
    from ..rewrite import resolve_owner

    out = []
    for target in SITES[site_id].targets:
        rt = installed.runtime(site_id, target.module)
        if rt is not None and target.module in sys.modules:
            out.append((resolve_owner(target)[0], rt))
    return out


def mla_layers(model: torch.nn.Module) -> list[tuple[torch.nn.Module, bool]]:
    """(layer, has an active indexer) for every MLA attention layer whose forward a site
    rewrote, judged by upstream's own condition compiled from that forward."""
    shapes = [pair for site_id in MLA_SITES for pair in _classes(site_id)]
    found = []
    for module in model.modules():
        for cls, rt in shapes:
            if isinstance(module, cls):
                found.append((module, bool(rt.compiled.active(module))))
                break
    return found


def register_layers(model: torch.nn.Module) -> int:
    """Register every layer an applied ``registry`` site's op must find by name."""
    from ..patches import SITES

    count = 0
    for site in SITES.values():
        if not site.registry:
            continue
        for cls, rt in _classes(site.id):
            for module in model.modules():
                if isinstance(module, cls):
                    register_layer(rt.layer_name(module), module)
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
        "registered_indexers": register_layers(model),
    }
    if not layers:  # not a DeepSeek model: nothing to say
        return report
    for name in FEATURES:
        if active_config.feature_config(name).enabled:
            census.post_load_reports[name] = report
    logger().info(
        "vllm-overlap deepseek: %d of %d MLA layers have an indexer to overlap with%s",
        active,
        len(layers),
        f"; {len(layers) - active} run upstream's statements: {NO_INDEXER}"
        if len(layers) > active
        else "",
    )
    return report
