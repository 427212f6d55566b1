"""The runtimes built in this process: one per site and target module, and the namespace each
target module's rewritten code calls (``_vllm_overlap_<feature>``, one object per feature and
module, holding the entries of the feature's sites in that module).

:func:`prepare` is what the plugin hands the rewrite engine: once the engine has matched a
site's form in a target, it compiles the branches from that match, builds the runtime, and
returns the global to inject. Every target of a site in one module shares one runtime, so
each must have matched the same form.
"""

from __future__ import annotations

import importlib
import types
from typing import Any

from vllm_overlap.engine.branches import compile_form
from vllm_overlap.engine.site import Feature, Site
from vllm_overlap.runtime.site_runtime import SiteRuntime

_runtimes: dict[tuple[str, str], SiteRuntime] = {}  # (site id, module) -> runtime
_namespaces: dict[tuple[str, str], types.SimpleNamespace] = {}  # (feature, module) -> namespace


def runtime(site_id: str, module: str) -> SiteRuntime | None:
    """The runtime of ``site_id`` in target module ``module``, once a target there is rewritten."""
    return _runtimes.get((site_id, module))


def runtimes() -> list[SiteRuntime]:
    return list(_runtimes.values())


def namespace(feature: str, module: str) -> types.SimpleNamespace | None:
    """What ``_vllm_overlap_<feature>`` is in ``module``'s rewritten code."""
    return _namespaces.get((feature, module))


def _entry(site: Site, rt: SiteRuntime, mode: str):
    modes = dict(site.modes)
    if mode not in modes:
        return site.entry, rt
    module_name, func = modes[mode].factory.split(":")
    return modes[mode].entry, getattr(importlib.import_module(module_name), func)(rt)


def prepare(feature: Feature, site: Site, mode: str):
    """The engine's ``inject`` callback for one target of ``site``."""

    def inject(source: str, form_index: int, func: Any) -> dict[str, Any]:
        from vllm_overlap.engine.rewrite import RewriteSkipped

        module = func.__module__
        rt = _runtimes.get((site.id, module))
        if rt is not None and rt.compiled.form_index != form_index:
            raise RewriteSkipped(
                f"matches form {form_index} of {site.id}, another target in {module} form "
                f"{rt.compiled.form_index}"
            )
        code = func.__code__
        compiled = compile_form(
            site, form_index, source, func.__globals__, code.co_filename, code.co_firstlineno
        )
        if rt is None:
            rt = _runtimes[(site.id, module)] = SiteRuntime(compiled)
        if site.registry:  # its op finds the layer by name: every instance registers itself
            from vllm_overlap.engine.rewrite import Target, resolve_owner
            from vllm_overlap.runtime.layer_registry import register_instances

            owner, _ = resolve_owner(Target(module, func.__qualname__))
            if site.checked_at_first_run:  # a user site's layer: named as it is built
                from vllm_overlap.engine.user_sites import REGISTERED_NAME
                from vllm_overlap.runtime.layer_registry import naming

                register_instances(owner, naming(site.id, REGISTERED_NAME))
            else:
                register_instances(owner, rt.layer_name)
        ns = _namespaces.setdefault((feature.name, module), types.SimpleNamespace())
        name, entry = _entry(site, rt, mode)
        setattr(ns, name, entry)
        return {feature.runtime_global: ns}

    return inject


def standalone(site: Site, target) -> SiteRuntime:
    """A runtime of ``site`` compiled from ``target``'s upstream function, without rewriting
    anything (benchmarks, calibrate, tests): its branches, serial path and op are those the
    rewritten code would use."""
    import inspect
    import textwrap

    from vllm_overlap.engine import rewrite

    original = rewrite.original_function(target)
    source = textwrap.dedent(inspect.getsource(original))
    index, _ = rewrite.first_match(source, site.anchor_sets("_unused"))
    code = original.__code__
    return SiteRuntime(
        compile_form(site, index, source, original.__globals__, code.co_filename, code.co_firstlineno)
    )
