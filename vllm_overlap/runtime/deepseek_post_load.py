"""After loading a DeepSeek model: say per feature how many of the model's MLA layers have an
indexer to overlap with (the per-site rows are ``census``'s, for every site; the legacy
indexers register themselves as they are built, ``layers.register_instances``).

Runs once per model, from the post-load hook, for ``deepseek_indexer`` and ``mla_q_b_proj``:
DeepSeek-V3/R1 (MLA without an indexer) and the V3.2 layers that reuse an earlier layer's
top-k have nothing to overlap; both features run upstream's statements there. One INFO line
says so, and ``census.post_load_reports`` keeps the counts.
"""

from __future__ import annotations

import torch

from vllm_overlap.config import active as active_config
from vllm_overlap.log import logger
from vllm_overlap.runtime import reports as census
from vllm_overlap.runtime.census import instances_of, site_classes

FEATURES = ("deepseek_indexer", "mla_q_b_proj")
NO_INDEXER = "no indexer"

# The sites whose targets are MLA attention layers; their gates say which have an indexer.
MLA_SITES = ("mla_q_b_proj_v32", "mla_q_b_proj_legacy", "deepseek_indexer_v32")


def mla_layers(model: torch.nn.Module, features: tuple) -> list[tuple[torch.nn.Module, bool]]:
    """(layer, has an active indexer) for every MLA attention layer whose forward a site of
    ``features`` rewrote, judged by upstream's own condition compiled from that forward."""
    sites = {site.id: site for feature in features for site in feature.sites}
    shapes = [pair for site_id in MLA_SITES if site_id in sites for pair in site_classes(sites[site_id])]
    return [(module, bool(rt.compiled.active(module))) for module, rt in instances_of(model, shapes)]


def post_load(model: torch.nn.Module, features: tuple) -> dict:
    """Report, log and return how many MLA layers have an indexer (``features``: the enabled
    DeepSeek features, as the plugin passes them)."""
    layers = mla_layers(model, features)
    active = sum(1 for _, has in layers if has)
    report = {
        "mla_layers": len(layers),
        "with_indexer": active,
        "serial": {NO_INDEXER: len(layers) - active} if len(layers) > active else {},
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
