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

Where a site declares its ``dispatch``, a layer is counted by the function its forward runs on
this platform, never by its class: a layer whose running method is not rewritten runs
upstream's statements, and one whose running method is upstream's own fork of the pair
(``outcomes.UPSTREAM``, vLLM 0.34's GDN ``forward_cuda``) is settled by the site's
``upstream_switch``, which turns upstream's mechanism on where upstream's conditions hold
(``gdn_upstream``): the one place this step changes a layer.

``census.site_reports`` keeps one row per site with layers in the model; one INFO line per
site says it.
"""

from __future__ import annotations

import sys
from collections import Counter

import torch

from vllm_overlap.config import active as active_config
from vllm_overlap.log import logger
from vllm_overlap.runtime import gates, refusals, stream_safety
from vllm_overlap.runtime import module_namespaces as installed
from vllm_overlap.runtime import reports as census


def applied_sites() -> list:
    """Every site whose rewritten code runs in this process, in the order they were applied."""
    sites: dict[str, object] = {}
    for rt in installed.runtimes():
        sites.setdefault(rt.site.id, rt.site)
    return [site for site in sites.values() if site_classes(site)]


def site_classes(site) -> list[tuple[type, object]]:
    """(class, runtime) of each target of ``site`` (a Site) rewritten now (one per class: a
    site's variants of one class share it)."""
    from vllm_overlap.engine.rewrite import applied_features, resolve_owner

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
        from vllm_overlap.engine.branches import compile_function

        name = f"{site.id}__reached"
        text = f"def {name}({site.params[0]}):\n    return bool({site.reached_when})\n"
        check = _reached_checks[site.id] = compile_function(text, name, {}, f"<vllm-overlap {name}>", 1)
    return check


def inactive_reason(rt) -> str:
    """Why a layer whose ``active`` condition is false runs only the ungated branch."""
    form = rt.site.forms[rt.compiled.form_index]
    return f"inactive: not ({form.active})"


def running_target(site, layer):
    """The site's target that ``layer``'s forward dispatches to on this platform (by the
    site's ``dispatch`` attribute), or None where the site declares no dispatch."""
    if not site.dispatch:
        return None
    method = getattr(getattr(layer, site.dispatch, None), "__func__", None)
    if method is None:
        return f"forward (no {site.dispatch} on the layer: which one runs here cannot be told)"
    name = method.__name__
    for target in site.targets:
        if target.qualname.rsplit(".", 1)[-1] == name and target.module in sys.modules:
            owner = _owner(target)
            if owner is not None and isinstance(layer, owner):
                return target
    return name  # a method that is none of the site's targets


def _owner(target):
    from vllm_overlap.engine.rewrite import resolve_owner

    try:
        return resolve_owner(target)[0]
    except Exception:
        return None


def platform_reason(site, layer, compiled: set[int]) -> tuple[bool, str] | None:
    """Where the site declares its dispatch: (overlaps, why) decided by the function that runs
    on this platform when it is not the overlay's rewrite (upstream's own fork, or upstream's
    statements); None where the overlay's rewrite runs (the ladder decides)."""
    from vllm_overlap import outcomes

    target = running_target(site, layer)
    if target is None:
        return None
    if isinstance(target, str):
        return False, f"serial: its {target} is not one of the site's targets (upstream's statements)"
    from vllm_overlap.engine.rewrite import applied_features

    if site.feature in applied_features(target):  # the overlay's rewrite runs here
        return None
    outcome = outcomes.outcomes.get((site.feature, str(target)))
    method = target.qualname.rsplit(".", 1)[-1]
    if outcome is not None and outcome.status == outcomes.UPSTREAM and site.upstream_switch:
        import importlib

        from vllm_overlap.runtime.streams import get_aux_stream

        module, func = site.upstream_switch.split(":")
        return getattr(importlib.import_module(module), func)(layer, id(layer) in compiled, get_aux_stream())
    if outcome is not None and outcome.status == outcomes.UPSTREAM:
        return False, f"upstream's own {method}: {outcome.reason}"
    why = outcome.describe() if outcome is not None else "not rewritten"
    return False, f"serial: its {method} runs upstream's statements ({why})"


def compiled_modules(model: torch.nn.Module) -> set[int]:
    """ids of the modules that run under torch.compile: everything inside a module vLLM's
    ``@support_torch_compile`` set to compile (``do_not_compile`` False)."""
    out: set[int] = set()
    for module in model.modules():
        if getattr(module, "do_not_compile", None) is False:
            out |= {id(m) for m in module.modules()}
    return out


def site_report(model: torch.nn.Module, site, compiled: set[int] | None = None) -> dict | None:
    """The census row of one site in ``model`` (None: no layer of the model runs it)."""
    found = layers_running(model, site)
    if not found:
        return None
    compiled = compiled_modules(model) if compiled is None else compiled
    mode = active_config.feature_config(site.feature).mode
    serial: Counter = Counter()
    upstream: Counter = Counter()
    for layer, rt in found:
        if (decided := platform_reason(site, layer, compiled)) is not None:
            (upstream if decided[0] else serial)[decided[1]] += 1
        elif mode != "dual_stream":
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
        # of the overlapping layers, those upstream's own fork runs (only where there are some)
        **({"upstream": dict(upstream)} if upstream else {}),
    }


def site_census(model: torch.nn.Module) -> dict[str, dict]:
    """One row per applied, enabled site that layers of ``model`` run."""
    rows = {}
    compiled = compiled_modules(model)
    for site in applied_sites():
        if active_config.feature_config(site.feature).enabled:
            row = site_report(model, site, compiled)
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
    from vllm_overlap.runtime.vllm_names import log_absent_once

    log_absent_once()
    mark_refusals(model)
    rows = site_census(model)
    census.site_reports.update(rows)
    second_stream = gates.overlap_possible()
    for site_id, row in rows.items():
        serial = "; ".join(f"{n} {why}" for why, n in row["serial"].items())
        upstream = "; ".join(f"{n} {why}" for why, n in row.get("upstream", {}).items())
        logger().info(
            "vllm-overlap site %s: %d of %d layers overlap%s%s%s",
            site_id,
            row["overlap"],
            row["layers"],
            f" ({upstream})" if upstream else "",
            f" (serial: {serial})" if serial else "",
            "" if second_stream else "; this platform has no second stream: upstream's "
            "statements run serially",
        )
    return rows
