"""The vLLM general plugin: ``register()`` runs in every vLLM process.

It reads the config, then installs a post-import hook per target module of each enabled feature
(through ``hooks``, the one way in); the rewrite happens when vLLM imports that module (in the
process that builds the model), so ``register()`` itself imports no torch and initialises no CUDA.

The firewall: the hooks run inside vLLM's own imports (and the post-load step inside its
loader), so no exception of ours may escape from them. A failure while applying a rewrite
becomes that target's ``skipped: internal error: <type>: <message>``; one anywhere else in a
hook is logged and swallowed. Only ``strict: true`` stops start-up, with one line
(:class:`StrictError`, a ``SystemExit``).
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
import weakref

from vllm_overlap import __version__, outcomes
from vllm_overlap.config import active as active_config
from vllm_overlap.config.loader import OverlayStop, load_config
from vllm_overlap.engine.rewrite import RewriteSkipped, TargetAbsent, apply, internal_error
from vllm_overlap.engine.site import Feature, Site
from vllm_overlap.log import logger
from vllm_overlap.runtime import cache_key, hooks
from vllm_overlap.runtime import reports as census
from vllm_overlap.sites import FEATURES

_lock = threading.RLock()
_registered = False
_announced = False

# The config's user sites (``vllm_overlap.engine.user_sites``): proven ones run as features of their
# own, ``user_<id>``; refused ones are recorded with the rule and statement that refused them.
USER_FEATURES: dict[str, Feature] = {}
USER_REFUSED: dict[str, tuple[str, str, str]] = {}  # feature name -> (module, function, reason)


def features() -> dict[str, Feature]:
    """Every feature of this process: the declared ones, then the config's proven user sites."""
    return {**FEATURES, **USER_FEATURES}


class StrictError(OverlayStop):
    """strict: true, and an enabled feature could not be applied: start-up stops."""


def register() -> None:
    """Entry point of ``vllm.general_plugins``. Idempotent. Raises only the documented one-line
    stops (ConfigError on a bad config, StrictError under ``strict: true``): a failure of ours
    anywhere else is logged and recorded, and vLLM starts without the overlay's hooks."""
    global _registered
    with _lock:
        if _registered:
            return
        loaded = load_config()
        active_config.set_loaded(loaded)
        try:
            _register(loaded)
        except OverlayStop:
            raise
        except Exception as exc:
            _registered = True
            REGISTER_FAILED.append(internal_error(exc, "register()"))
            hooks.log_internal_error(REGISTER_FAILED[-1])


# Why register() did nothing (empty: it did what the config asks).
REGISTER_FAILED: list[str] = []


def _register(loaded) -> None:
    global _registered
    _prove_user_sites(loaded)
    for feature in features().values():
        status = outcomes.PENDING if _enabled(feature) else outcomes.OFF
        for rewrite in feature.rewrites:
            outcomes.record(outcomes.Outcome(feature.name, str(rewrite.target), status))
    _registered = True
    cache_key.install(loaded.config)
    if not any(o.status == outcomes.PENDING for o in outcomes.outcomes.values()):
        _announce()  # nothing will ever be imported for us: say so now
        return
    _install_post_load_hooks()
    for module in sorted({m for f in features().values() for m in f.modules()}):
        if any(_enabled(f) and module in f.modules() for f in features().values()):
            hooks.on_import(module, _on_import, what=f"in the hook on {module}")


def _prove_user_sites(loaded) -> None:
    """Prove each enabled user site against the installed vLLM's source (read, not imported);
    a refusal, or a failure of ours, is that site's outcome, never an exception into vLLM."""
    from vllm_overlap.engine.user_sites import feature_of, prove_all

    USER_FEATURES.clear()
    USER_REFUSED.clear()
    config = loaded.config
    if not config.enabled or not config.sites:
        return
    try:
        proofs = prove_all(config, loaded.source)
    except Exception as exc:  # ours
        for cfg in config.sites:
            USER_REFUSED[cfg.feature_name] = (cfg.module, cfg.function, internal_error(exc, "proving user sites"))
        proofs = []
    for proof in proofs:
        cfg = proof.config
        if not cfg.enabled:
            USER_REFUSED[cfg.feature_name] = (cfg.module, cfg.function, "off")
            continue
        if proof.site is None:
            reason = f"refused: {proof.refused}"
            USER_REFUSED[cfg.feature_name] = (cfg.module, cfg.function, reason)
            outcomes.record(
                outcomes.Outcome(cfg.feature_name, f"{cfg.module}.{cfg.function}", outcomes.SKIPPED, reason)
            )
            continue
        USER_FEATURES[cfg.feature_name] = feature_of(proof)
        if proof.plain_reason:
            _log_info(f"vllm-overlap user site {cfg.id}: {proof.plain_reason}")
    refused = [f"{n}: {r}" for n, (_, _, r) in USER_REFUSED.items() if r != "off"]
    if refused and config.strict:
        raise StrictError(f"strict: true and a user site cannot be applied: {'; '.join(refused)}")


# Every loader reaches vLLM's post-processing through this function (BaseModelLoader, the
# weight-cache daemon and IPC loaders call it directly); modules that imported it by name
# before the hook ran are rebound to the wrapped one.
LOADER_UTILS = "vllm.model_executor.model_loader.utils"
POST_PROCESS = "process_weights_after_loading"
SITE_CENSUS = "vllm_overlap.runtime.census:post_load"


def _post_load_steps() -> list[tuple[str, tuple]]:
    """(step, the enabled features that declare it) in order: the site census first (it
    counts the layers as loaded, before any fusing; it reads every enabled site itself), then
    each step once, however many features share it (the DeepSeek features share one)."""
    steps: dict[str, list] = {}
    if any(_enabled(feature) for feature in features().values()):
        steps[SITE_CENSUS] = []
    for feature in features().values():
        cfg = active_config.feature_config(feature.name)
        if cfg.enabled and feature.post_load and cfg.mode in feature.post_load_modes:
            steps.setdefault(feature.post_load, []).append(feature)
    return [(step, tuple(owners)) for step, owners in steps.items()]


def _install_post_load_hooks() -> None:
    """Run the site census and each enabled feature's post-load step before vLLM
    post-processes the weights, once per model, whichever loader loads it."""
    steps = _post_load_steps()
    if not steps:
        return
    done: weakref.WeakSet = weakref.WeakSet()  # models whose steps ran (a loader may re-run)

    def before(instance, args, kwargs):
        model = args[0] if args else kwargs["model"]
        if model not in done:
            done.add(model)
            for step, owners in steps:
                _run_post_load_step(step, owners, model)

    def hook(module) -> None:
        original = vars(module).get(POST_PROCESS)
        if original is None or hooks.is_ours(original):
            return
        wrapped = hooks.wrap_function(original, before=before, what=f"the post-load steps ({POST_PROCESS})")
        for name, other in list(sys.modules.items()):  # itself, and loaders that bound it
            namespace = getattr(other, "__dict__", None)
            if name.startswith("vllm.") and isinstance(namespace, dict):
                if namespace.get(POST_PROCESS) is original:
                    setattr(other, POST_PROCESS, wrapped)

    hooks.on_import(LOADER_UTILS, hook, what=f"in the hook on {LOADER_UTILS}")


def _run_post_load_step(step: str, owners: tuple, model) -> None:
    """One post-load step: the census with the model, a feature's step with the model and the
    features that declare it (it reads their sites from them, never from the registry). A
    failure of ours is logged (the layers it did not reach keep running their fallback), never
    raised into vLLM's loader, unless strict."""
    try:
        module_name, func = step.split(":")
        function = getattr(importlib.import_module(module_name), func)
        function(model, owners) if owners else function(model)
    except Exception as exc:
        reason = internal_error(exc, f"post-load step {step}")
        census.post_load_reports[step] = {"error": reason}
        if active_config.loaded().config.strict:
            raise StrictError(f"strict: true and a post-load step failed: {reason}") from None
        hooks.log_internal_error(reason)


def _log_info(line: str) -> None:
    try:
        logger().info("%s", line)
    except Exception:  # the logger itself: nothing more can be said
        pass


def _enabled(feature: Feature) -> bool:
    return active_config.feature_config(feature.name).enabled


def _on_import(module) -> None:
    apply_module(module.__name__)


def apply_module(module_name: str) -> list[outcomes.Outcome]:
    """Apply every enabled feature's rewrites that target ``module_name``: per target, its
    sites in their declared stacking order."""
    with _lock:
        results = []
        for site, rewrite in stacking_order(module_name):
            results.append(apply_rewrite(features()[site.feature], site, rewrite))
        _announce()
        _enforce_strict(results)
        return results


def stacking_order(module_name: str) -> list[tuple[Site, object]]:
    """(site, rewrite) of every enabled feature in ``module_name``, in the order they apply:
    by the site's ``stack``, then the registry's order."""
    pairs = []
    for feature in features().values():
        if not _enabled(feature):
            continue
        mode = active_config.feature_config(feature.name).mode
        for rewrite in feature.rewrites_in(module_name, mode):
            pairs.append((feature.site(rewrite.site), rewrite))
    order = {s.id: i for i, s in enumerate(s for f in features().values() for s in f.sites)}
    return sorted(pairs, key=lambda pair: (pair[0].stack, order[pair[0].id]))


def apply_rewrite(feature: Feature, site: Site, rewrite) -> outcomes.Outcome:
    """One site's rewrite of one target; the outcome is recorded and returned."""
    target = str(rewrite.target)
    mode = active_config.feature_config(feature.name).mode
    try:
        if mode not in feature.modes or (mode != "dual_stream" and mode not in dict(site.modes)):
            raise RewriteSkipped(f"mode {mode!r} is not implemented for site {site.id} in this version")
        if site.traced_differs(mode):  # a stale compiled graph would be silent wrong code
            unkeyed = cache_key.unkeyed_reason()
            if unkeyed:
                raise RewriteSkipped(unkeyed)
        path = apply(
            rewrite.target,
            rewrite.anchors,
            feature.name,
            inject=_load_runtime().prepare(feature, site, mode),
            older=rewrite.older,
        )
        outcome = outcomes.Outcome(feature.name, target, outcomes.APPLIED, path=path)
    except TargetAbsent as exc:
        outcome = outcomes.Outcome(feature.name, target, outcomes.ABSENT, str(exc))
    except RewriteSkipped as exc:
        upstream = _upstream_fork(site, rewrite.target)
        if upstream:  # upstream forks this pair itself: step aside, nothing wrong
            outcome = outcomes.Outcome(feature.name, target, outcomes.UPSTREAM, upstream.split(": ", 1)[1])
        else:
            outcome = outcomes.Outcome(feature.name, target, outcomes.SKIPPED, str(exc))
    except Exception as exc:  # ours: a bad declaration or an engine bug
        outcome = outcomes.Outcome(feature.name, target, outcomes.SKIPPED, internal_error(exc))
    outcomes.record(outcome)
    return outcome


def _upstream_fork(site: Site, target) -> str | None:
    """``upstream: <how>`` where the live target forks the site's pair itself (None: it does
    not, or its source cannot be read)."""
    from vllm_overlap.engine.rewrite import upstream_source
    from vllm_overlap.engine.upstream import upstream_fork_in_source

    try:
        return upstream_fork_in_source(upstream_source(target), site)
    except Exception:  # no source, or not a function: not recognised
        return None


RUNTIME = "vllm_overlap.runtime.module_namespaces"


def _load_runtime():
    """The site runtime; any failure to import it is a reason to skip, never an exception
    escaping into vLLM's own import of the target module."""
    try:
        return importlib.import_module(RUNTIME)
    except Exception as exc:
        raise RewriteSkipped(internal_error(exc, f"importing {RUNTIME}")) from None


def _enforce_strict(results: list[outcomes.Outcome]) -> None:
    if not active_config.loaded().config.strict:
        return
    skipped = [o for o in results if o.status == outcomes.SKIPPED]
    if skipped:
        what = "; ".join(f"{o.feature} on {o.target}: {o.reason}" for o in skipped)
        raise StrictError(f"strict: true and an enabled feature cannot be applied: {what}")


def feature_summary(feature: Feature) -> str:
    """One feature's state in a few words, e.g. ``applied (4/4 targets)``: of the targets in
    modules this process imported, not counting those of other releases (absent here)."""
    outs = outcomes.feature_outcomes(feature.name)
    statuses = {o.status for o in outs}
    if statuses == {outcomes.OFF}:
        return "off"
    applied = [o for o in outs if o.status == outcomes.APPLIED]
    skipped = [o for o in outs if o.status == outcomes.SKIPPED]
    upstream = [o for o in outs if o.status == outcomes.UPSTREAM]
    if not applied and not skipped and not upstream:
        return "not loaded (its model code was not imported in this process)"
    parts = []
    if applied:  # of the targets this process imported that this vLLM has
        parts.append(f"applied ({len(applied)}/{len(applied) + len(skipped) + len(upstream)} targets)")
    for o in upstream:
        parts.append(f"upstream on {o.target.rsplit('.', 1)[-1]}: {o.reason}")
    for o in skipped:
        parts.append(f"skipped {o.target.rsplit('.', 1)[-1]}: {o.reason}")
    return "; ".join(parts)


def summary_line() -> str:
    loaded = active_config.loaded()
    feats = ", ".join(
        [f"{f.name} {feature_summary(f)}" for f in features().values()]
        + [f"{name} {reason}" for name, (_, _, reason) in USER_REFUSED.items()]
    )
    notes = [f"; {reason}" for reason in REGISTER_FAILED]
    if cache_key.keyed_nowhere():
        notes.append(f"; compile-cache key: {cache_key.describe()}")
    return f"vllm-overlap {__version__} [pid {os.getpid()}] config {loaded.source}: {feats}" + "".join(notes)


def _announce() -> None:
    """Log the state line: once per process, then once more per later change."""
    global _announced
    line = summary_line()
    logger().info("%s", line if not _announced else line.replace(": ", " (update): ", 1))
    _announced = True
