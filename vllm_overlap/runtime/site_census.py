"""After loading, per site: how many of the model's layers run it, how many of those overlap,
and why the others run upstream's statements. Built from the declarations, for every site.

Runs once per model from the post-load hook (before vLLM post-processes the weights),
whatever the features' modes. A layer of a rewritten target's class runs the site. It
overlaps where the feature is in mode ``dual_stream`` and upstream's own ``active`` condition
holds and every linear layer its branches call is stream-safe and no declared refusal covers
it; otherwise the census names why not (the mode, the refusal, the condition that is false,
the site's ``reached_when`` being false on the layer, so that its forward takes upstream's other
path and never reaches the site, or the kernel with a per-device workspace). What is decided per call
  (a second stream, the token range, CUDA-graph capture, DBO threads, LoRA, which vLLM wraps
  after this step) is not a layer's property: the log line names the platform's answer for
  the second stream, and the per-call rules are the ladder's (``site_runtime``).

``census.site_reports`` keeps one row per site with layers in the model; one INFO line per
site says it.
"""

from __future__ import annotations

import sys
from collections import Counter

import torch

from .. import active_config, census
from ..log import logger
from . import gates, installed, refusals, stream_safety


def applied_sites() -> list:
    """Every site whose rewritten code runs in this process, in the order they were applied."""
    sites: dict[str, object] = {}
    for rt in installed.runtimes():
        sites.setdefault(rt.site.id, rt.site)
    return [site for site in sites.values() if site_classes(site)]


def site_classes(site) -> list[tuple[type, object]]:
    """(class, runtime) of each target of ``site`` (a Site) rewritten now (one per class: a
    site's variants of one class share it)."""
    from ..rewrite import applied_features, resolve_owner

    out: list[tuple[type, object]] = []
    for target in site.targets:
        rt = installed.runtime(site.id, target.module)
        if rt is None or target.module not in sys.modules:
            continue
        if site.feature not in applied_features(target):  # reverted since
            continue
        cls = resolve_owner(target)[0]
        if all(cls is not known for known, _ in out):
            out.append((cls, rt))
    return out


def layers_running(model: torch.nn.Module, site) -> list[tuple[torch.nn.Module, object]]:
    """(layer, runtime) for every module of ``model`` that runs ``site``'s rewritten code."""
    return instances_of(model, site_classes(site))


def instances_of(model: torch.nn.Module, classes) -> list[tuple[torch.nn.Module, object]]:
    """(module, runtime) for every module of ``model`` that is an instance of one of the
    ``(class, runtime)`` pairs (the first that matches)."""
    found = []
    for module in model.modules():
        for cls, rt in classes:
            if isinstance(module, cls):
                found.append((module, rt))
                break
    return found


def projections_of(rt, layer) -> tuple:
    """The modules the site's branches call on ``layer`` that hang off the layer itself (those
    reached through another entry parameter are judged per call by the ladder)."""
    params = rt.site.params
    try:
        found = rt.compiled.projections(layer, *([None] * (len(params) - 1)))
    except Exception:  # a projection reached through another parameter: judge the layer
        found = (layer,)
    return tuple(m for m in found if isinstance(m, torch.nn.Module))


def unreached_reason(site, layer) -> str:
    """Why ``layer``'s forward never reaches the site's statements ("" if it does): the site's
    ``reached_when`` (upstream's own condition for the path that holds them) is false on it."""
    if site.reached_when and not _reached(site)(layer):
        return f"not reached: upstream's forward takes another path here (the site needs {site.reached_when})"
    return ""


_reached_checks: dict[str, object] = {}


def _reached(site):
    check = _reached_checks.get(site.id)
    if check is None:
        from ..branches import compile_function

        name = f"{site.id}__reached"
        text = f"def {name}({site.params[0]}):\n    return bool({site.reached_when})\n"
        check = _reached_checks[site.id] = compile_function(text, name, {}, f"<vllm-overlap {name}>", 1)
    return check


def inactive_reason(rt) -> str:
    """Why a layer whose ``active`` condition is false runs only the ungated branch."""
    form = rt.site.forms[rt.compiled.form_index]
    return f"inactive: not ({form.active})"


def site_report(model: torch.nn.Module, site) -> dict | None:
    """The census row of one site in ``model`` (None: no layer of the model runs it)."""
    found = layers_running(model, site)
    if not found:
        return None
    mode = active_config.feature_config(site.feature).mode
    serial: Counter = Counter()
    for layer, rt in found:
        if mode != "dual_stream":
            serial[f"mode {mode}"] += 1
        elif refused := refusals.reason(layer, site.id):
            serial[refused] += 1
        elif rt.compiled.active is not None and not rt.compiled.active(layer):
            serial[inactive_reason(rt)] += 1
        elif unreached := unreached_reason(site, layer):
            serial[unreached] += 1
        elif unsafe := stream_safety.first_unsafe(projections_of(rt, layer)):
            serial[f"not stream-safe: {unsafe}"] += 1
        elif untrusted := rt.untrusted_callee(layer):
            serial[untrusted] += 1
    return {
        "feature": site.feature,
        "mode": mode,
        "layers": len(found),
        "overlap": len(found) - sum(serial.values()),
        "serial": dict(serial),
    }


def site_census(model: torch.nn.Module) -> dict[str, dict]:
    """One row per applied, enabled site that layers of ``model`` run."""
    rows = {}
    for site in applied_sites():
        if active_config.feature_config(site.feature).enabled:
            row = site_report(model, site)
            if row is not None:
                rows[site.id] = row
    return rows


def mark_refusals(model: torch.nn.Module) -> None:
    """Mark the layers of every applied site that sit inside a class the site refuses."""
    for site in applied_sites():
        if site.refused_inside:
            refusals.mark(model, site, [layer for layer, _ in layers_running(model, site)])


def post_load(model: torch.nn.Module) -> dict[str, dict]:
    """Mark declared refusals, then report, log and return the census (and, once per process,
    the vLLM names this release lacks with the fallback taken for each)."""
    from ..vllm_names import log_absent_once

    log_absent_once()
    mark_refusals(model)
    rows = site_census(model)
    census.site_reports.update(rows)
    second_stream = gates.overlap_possible()
    for site_id, row in rows.items():
        serial = "; ".join(f"{n} {why}" for why, n in row["serial"].items())
        logger().info(
            "vllm-overlap site %s: %d of %d layers overlap%s%s",
            site_id,
            row["overlap"],
            row["layers"],
            f" (serial: {serial})" if serial else "",
            "" if second_stream else "; this platform has no second stream: upstream's "
            "statements run serially",
        )
    return rows
