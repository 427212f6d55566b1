"""gdn_in_proj mode ``fused``: one GEMM over ``in_proj_qkvz`` and ``in_proj_ba`` (vLLM #41457).

The rewritten forwards call :func:`fused_in_proj`'s entry in place of the site's in this mode.

:func:`fuse_model` runs once, after the checkpoint is loaded and before vLLM post-processes
the weights (so the platform's GEMM preparation, e.g. the CPU's oneDNN packing, applies to
the fused projection). Each eligible GDN layer gets one ``MergedColumnParallelLinear`` whose
per-rank weight is ``cat([qkvz_shard, ba_shard])``; the two original projections are removed
from the layer, so no extra parameter memory is kept. A layer is eligible only when both
projections are unquantised, of one dtype, without bias, not LoRA-wrapped and sharded alike.
"""

from __future__ import annotations

from collections import Counter

import torch

from vllm_overlap import outcomes
from vllm_overlap.config import active as active_config
from vllm_overlap.log import logger
from vllm_overlap.runtime import reports as census
from vllm_overlap.runtime.gates import is_lora

FUSED = "vllm_overlap_in_proj_qkvz_ba"  # the fused projection's submodule name on the layer
# Set on every layer fuse_model looked at, fused or not: a layer without it was loaded by a
# path that skipped the post-load step (a loader that never post-processes weights).
CONSIDERED = "_vllm_overlap_fuse_considered"


def why_not_fusable(layer: torch.nn.Module) -> str | None:
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    projections = {"in_proj_qkvz": layer.in_proj_qkvz, "in_proj_ba": layer.in_proj_ba}
    for name, proj in projections.items():
        if is_lora(proj):
            return f"{name} is LoRA-wrapped"
        if not isinstance(getattr(proj, "quant_method", None), UnquantizedLinearMethod):
            return f"{name} is quantised ({type(getattr(proj, 'quant_method', None)).__name__})"
        if getattr(proj, "bias", None) is not None:
            return f"{name} has a bias"
    qkvz, ba = projections.values()
    if qkvz.weight.dtype != ba.weight.dtype:
        return f"dtypes differ ({qkvz.weight.dtype} vs {ba.weight.dtype})"
    if (qkvz.tp_size, qkvz.tp_rank) != (ba.tp_size, ba.tp_rank):
        return "sharded differently (in_proj_ba is replicated)"
    if qkvz.input_size != ba.input_size:
        return "input sizes differ"
    return None


def fuse_layer(layer: torch.nn.Module) -> tuple[int, int]:
    """Replace the layer's two projections by one; return parameter bytes (before, after)."""
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear

    qkvz, ba = layer.in_proj_qkvz, layer.in_proj_ba
    before = sum(p.numel() * p.element_size() for p in (*qkvz.parameters(), *ba.parameters()))
    fused = MergedColumnParallelLinear(
        input_size=qkvz.input_size,
        output_sizes=[*qkvz.output_sizes, *ba.output_sizes],
        bias=False,
        quant_config=None,
        params_dtype=qkvz.weight.dtype,
        disable_tp=qkvz.tp_size == 1,  # eligible layers shard alike; size 1 = replicated
        prefix=f"{layer.prefix}.{FUSED}",
    )
    if fused.output_size_per_partition != (
        qkvz.output_size_per_partition + ba.output_size_per_partition
    ):
        raise RuntimeError("fused projection has the wrong per-rank width")  # pragma: no cover
    fused.weight.data = torch.cat([qkvz.weight.data, ba.weight.data], dim=0)
    layer.add_module(FUSED, fused)
    layer._vllm_overlap_widths = (qkvz.output_size_per_partition, ba.output_size_per_partition)
    del layer._modules["in_proj_qkvz"], layer._modules["in_proj_ba"]
    after = sum(p.numel() * p.element_size() for p in fused.parameters())
    return before, after


def fuse_model(model: torch.nn.Module, features: tuple) -> dict:
    """Fuse every eligible GDN layer of ``model`` (``features``: the gdn_in_proj feature, as
    the plugin passes it); log and return what happened."""
    from vllm_overlap.runtime.census import layers_running

    config = active_config.feature_config("gdn_in_proj")
    # the GDN layers whose forwards the site rewrote (whichever class this release has)
    layers = [layer for feature in features for site in feature.sites for layer, _ in layers_running(model, site)]
    statuses = {o.status for o in outcomes.feature_outcomes("gdn_in_proj")}
    every_variant = outcomes.APPLIED in statuses and outcomes.SKIPPED not in statuses
    skipped: Counter = Counter()
    report = {"layers": len(layers), "fused": 0, "bytes_before": 0, "bytes_after": 0}
    for layer in layers:
        layer.__dict__[CONSIDERED] = True
        if FUSED in layer._modules:
            report["fused"] += 1
            continue
        reason = why_not_fusable(layer) if every_variant else "not every forward was rewritten"
        if reason:
            skipped[reason] += 1
            continue
        before, after = fuse_layer(layer)
        report["fused"] += 1
        report["bytes_before"] += before
        report["bytes_after"] += after
    report["skipped"] = dict(skipped)
    report["fallback"] = config.fused_fallback
    census.post_load_reports["gdn_in_proj"] = report
    if layers:
        why = "; ".join(f"{n} layers: {r}" for r, n in skipped.items())
        logger().info(
            "vllm-overlap gdn_in_proj fused %d/%d GDN layers (projection parameter bytes "
            "%d before, %d after)%s",
            report["fused"],
            report["layers"],
            report["bytes_before"],
            report["bytes_after"],
            f"; not fused, running {config.fused_fallback}: {why}" if why else "",
        )
    return report


@torch.compiler.assume_constant_result  # said while tracing, not per call in a graph
def _warn_not_fused(prefix: str, fallback: str) -> bool:
    if prefix not in _warned:
        _warned.add(prefix)
        logger().warning(
            "vllm-overlap gdn_in_proj fused: layer %s was never fused (the post-load step did "
            "not run for its model); it runs %s", prefix, fallback,
        )
    return True


_warned: set[str] = set()


def fused_in_proj(site_runtime):
    """The mode's entry for the gdn_in_proj site: one GEMM over the concatenated weights, then
    a split. Outputs are made contiguous (a no-op for one token, where the split halves
    already are) so every variant's kernels see the layout they get upstream. A layer the
    post-load step did not fuse runs the configured fallback: the site's own entry
    (dual_stream) or upstream's statements (serial)."""
    site = site_runtime.site

    def entry(layer, hidden_states):
        fused = getattr(layer, FUSED, None)
        if fused is None:
            if not getattr(layer, CONSIDERED, False):
                _warn_not_fused(layer.prefix, active_config.site_config(site).fused_fallback)
            if active_config.site_config(site).fused_fallback == "dual_stream":
                return site_runtime(layer, hidden_states)
            return site.result(*site_runtime.serial(layer, hidden_states))
        out, _ = fused(hidden_states)
        mixed_qkvz, ba = out.split(layer._vllm_overlap_widths, dim=-1)
        return mixed_qkvz.contiguous(), ba.contiguous()

    return entry
