"""``vllm-overlap doctor``: what applies to the installed vLLM, and why not.

Registers the overlay in this process, imports every target module of each enabled feature (the
post-import hooks apply the rewrites), and reports per target: anchors found, the result, and the
versions, config, cache and compile-cache key they ran with (``--model``: which features a model's
layers use, from its Hugging Face config).
"""

from __future__ import annotations

import importlib
import json

from vllm_overlap import __version__
from vllm_overlap.cli.command import Command


def _versions() -> dict[str, str]:
    from vllm_overlap.engine.sources import installed_vllm

    info = {"vllm-overlap": __version__}
    found = installed_vllm()
    info["vllm"] = f"{found[1]} ({found[0]})" if found else "not installed"
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        info["torch"] = "not installed"
    try:
        from vllm.platforms import current_platform

        info["platform"] = str(current_platform.device_type or current_platform._enum)
    except Exception as exc:  # doctor reports, it does not fail on this
        info["platform"] = f"unknown ({type(exc).__name__})"
    return info


def _anchor_counts(rewrite) -> str:
    """How many times each anchor occurs in the upstream source, as 'found/expected';
    ``- (<error type>)`` where they cannot be counted (the result column says why)."""
    from vllm_overlap.engine.rewrite import check_anchors, find_anchor, function_node, upstream_source

    def counts(anchors) -> list[int]:
        return [len(find_anchor(node, a)) for a in anchors]

    def shown(found, anchors) -> str:
        return ", ".join(f"{n}/{a.count}" for n, a in zip(found, anchors))

    try:
        check_anchors(rewrite.anchor_sets)
        node = function_node(upstream_source(rewrite.target))
        # The set the rewrite uses (rewrite_first: the first that matches), else the newest.
        for i, anchors in enumerate(rewrite.anchor_sets):
            found = counts(anchors)
            if found == [a.count for a in anchors]:
                return shown(found, anchors) + (" (older)" if i else "")
        return shown(counts(rewrite.anchors), rewrite.anchors)
    except Exception as exc:  # doctor reports, it does not fail
        return f"- ({type(exc).__name__})"


def model_features(hf_config) -> list[dict]:
    """Per feature, whether a model with this Hugging Face config runs its sites: by the
    architecture vLLM builds (``architectures``), then the feature's own config check."""
    from vllm_overlap.engine.architectures import model_reason
    from vllm_overlap.sites import FEATURES

    rows = []
    for feature in FEATURES.values():
        reason = model_reason(feature, hf_config)
        rows.append({"feature": feature.name, "this model": f"skipped: {reason}" if reason else "uses it"})
    return rows


def model_rows(model: str) -> dict:
    """Per feature, whether the model at ``model`` (a local directory or cached hub id) runs
    the layers it overlaps, read from its Hugging Face config."""
    from transformers import AutoConfig

    from vllm_overlap.engine.architectures import architectures_of

    hf_config = AutoConfig.from_pretrained(model)
    return {
        "path": model,
        "model_type": getattr(hf_config, "model_type", "?"),
        "architectures": architectures_of(hf_config),
        "rows": model_features(hf_config),
    }


def _vllm_names() -> list[dict]:
    from vllm_overlap.runtime.vllm_names import report

    return report()


def collect(model: str | None = None) -> dict:
    """Load the config, apply every enabled feature in this process, and report."""
    from vllm_overlap import outcomes
    from vllm_overlap.config import active as active_config
    from vllm_overlap.runtime import plugin

    plugin.register()
    loaded = active_config.loaded()
    features = plugin.features()  # the declared ones, then the config's proven user sites
    for feature in features.values():
        if not loaded.config.feature(feature.name).enabled:
            continue
        for module in feature.modules():
            try:
                importlib.import_module(module)  # the post-import hook applies the rewrites
            except Exception as exc:
                absent = isinstance(exc, ModuleNotFoundError) and module.startswith(exc.name or "?")
                for rewrite in feature.rewrites_in(module):
                    outcomes.record(
                        outcomes.Outcome(
                            feature.name,
                            str(rewrite.target),
                            outcomes.ABSENT if absent else outcomes.SKIPPED,
                            f"module {exc.name} not in this vLLM"
                            if absent
                            else f"module not importable: {type(exc).__name__}: {exc}",
                        )
                    )
    rows, absent, ok = [], [], True
    for feature in features.values():
        enabled = loaded.config.feature(feature.name).enabled
        for rewrite in feature.rewrites:
            outcome = outcomes.outcomes[(feature.name, str(rewrite.target))]
            if outcome.status == outcomes.ABSENT:  # another release's code shape of a site
                absent.append(f"{feature.name} {rewrite.target}: {outcome.reason}")
                continue
            # upstream forking the pair itself there is not a failure (the overlay steps aside)
            ok = ok and (not enabled or outcome.status in (outcomes.APPLIED, outcomes.UPSTREAM))
            rows.append(
                {
                    "feature": feature.name,
                    "target": rewrite.target.qualname,
                    "module": rewrite.target.module,
                    "enabled": enabled,
                    "anchors": _anchor_counts(rewrite) if enabled else "-",
                    "result": outcome.describe(),
                }
            )
    for name, (module, function, reason) in plugin.USER_REFUSED.items():  # refused, or off
        enabled = reason != "off"
        ok = ok and not enabled
        rows.append(
            {
                "feature": name,
                "target": function,
                "module": module,
                "enabled": enabled,
                "anchors": "-",
                "result": reason if enabled else "off",
            }
        )
    from vllm_overlap.engine import cache_dir
    from vllm_overlap.runtime import cache_key, hooks
    from vllm_overlap.runtime.streams import DBO_POLICY

    return {
        **_versions(),
        "dual_batch_overlap": DBO_POLICY,
        "config": loaded.source,
        "config_fingerprint": loaded.config.fingerprint(),
        "strict": loaded.config.strict,
        "cache_dir": cache_dir.report(),  # where rewritten sources go, and why others were refused
        "compile_cache_key": cache_key.describe(),
        "hook_failures": list(hooks.failures) + list(plugin.REGISTER_FAILED),
        "rows": rows,
        "absent": absent,
        "vllm_names": _vllm_names(),
        "ok": ok,
        **({"model": model_rows(model)} if model else {}),
    }


def doctor_report(report: dict) -> str:
    from vllm_overlap.engine.cache_dir import describe
    head = [
        f"vllm-overlap {report['vllm-overlap']}",
        f"vLLM:     {report['vllm']}",
        f"torch:    {report['torch']}",
        f"platform: {report['platform']}",
        f"config:   {report['config']} (fingerprint {report['config_fingerprint']}, "
        f"strict: {str(report['strict']).lower()})",
        f"DBO:      {report['dual_batch_overlap']}",
        *([f"cache:    {describe(report['cache_dir'])}"] if "cache_dir" in report else []),
        *([f"compile-cache key: {report['compile_cache_key']}"] if "compile_cache_key" in report else []),
        *(f"internal error: {reason}" for reason in report.get("hook_failures", [])),
        "",
    ]
    rows = [dict(r, enabled="yes" if r["enabled"] else "no") for r in report["rows"]]
    from vllm_overlap.cli.tables import format_table

    table = format_table(rows, ["feature", "target", "enabled", "anchors", "result"])
    verdict = "all enabled features applied" if report["ok"] else "NOT all enabled features applied"
    text = "\n".join(head) + table + f"\n\n{verdict}"
    missing = [n for n in report.get("vllm_names", []) if n["status"].startswith("absent")]
    if missing:
        text += "\n\nvLLM names the runtime reads that this vLLM lacks:\n" + format_table(
            missing, ["name", "status"]
        )
    if report.get("absent"):
        text += (
            f"\n({len(report['absent'])} targets are other vLLM releases' code, not in this one: "
            "--json lists them)"
        )
    if "model" in report:
        model = report["model"]
        text += f"\n\nmodel:    {model['path']} ({model['model_type']})\n"
        text += format_table(model["rows"], ["feature", "this model"])
    return text


def run(args) -> int:
    report = collect(args.model)
    print(json.dumps(report, indent=2) if args.json else doctor_report(report))
    return 0 if report["ok"] else 1


def arguments(parser) -> None:
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--model", default=None, help="also say which features this model (path or HF id) uses")


COMMAND = Command("doctor", "what applies to the installed vLLM, and why not", run, arguments)
