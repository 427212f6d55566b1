"""The one way in: every hook and wrapper the overlay installs into vLLM goes through here.

vLLM calls ``register()`` without a try, and the overlay's hooks then run inside vLLM's own
imports, its loader and its config, so an exception of ours there stops vLLM (vLLM 0.34.0
removed ``VllmConfig.compute_hash``; a direct ``wrapt`` hook on it made vLLM unable to start).
Nothing else in the package imports ``wrapt`` (``tests/test_hooks.py`` reads every module's
syntax tree to hold that), and everything here is firewalled:

- :func:`on_import` runs a hook after vLLM imports a module; whatever the hook raises is
  logged (``internal error: ...``) and recorded in :data:`failures`, never raised into the
  import (but a strict stop, :class:`~vllm_overlap.config.loader.OverlayStop`, which is meant to stop).
- :func:`wrap` puts ``before`` / ``after`` steps of ours around a vLLM callable. vLLM's own
  callable runs exactly as it would, its exceptions untouched; a failure in our steps is
  logged and recorded, and the call goes on with vLLM's own result.
- A name that is missing (a release that moved it) is reported to the caller, never raised.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import wrapt

from vllm_overlap.config.loader import OverlayStop
from vllm_overlap.engine.rewrite import internal_error

# What went wrong inside a hook or wrapper of ours in this process: "<what>: <reason>".
failures: list[str] = []
# What this process hooked and wrapped: module names, and (module, qualified name) pairs
# (``vllm_names`` must list each wrapped vLLM name; tests/test_hooks.py holds that).
hooked: list[str] = []
wrapped: list[tuple[str, str]] = []


def _report(reason: str) -> None:
    failures.append(reason)
    log_internal_error(reason)


def log_internal_error(reason: str) -> None:
    """Log an internal error (``internal error: ...``) as a warning, never raising. Only this;
    the hooks' own failures are also recorded in :data:`failures` (``_report``)."""
    try:
        from vllm_overlap.log import logger

        logger().warning("vllm-overlap: %s", reason)
    except Exception:  # the logger itself: nothing more can be said
        pass


def guarded(step: Callable[..., Any], what: str, *args: Any, default: Any = None) -> Any:
    """``step(*args)``, or ``default`` where it raises (logged, recorded); a strict stop passes."""
    try:
        return step(*args)
    except OverlayStop:
        raise
    except Exception as exc:
        _report(internal_error(exc, what))
        return default


def on_import(module_name: str, hook: Callable[[Any], None], what: str = "") -> None:
    """Run ``hook(module)`` once ``module_name`` is imported (at once if it already is)."""
    label = what or f"in the hook on {module_name}"

    def firewalled(module: Any) -> None:
        guarded(hook, label, module)

    hooked.append(module_name)
    guarded(wrapt.register_post_import_hook, f"registering {label}", firewalled, module_name)


def _wrapper(before, after, what: str):
    def wrapper(wrapped, instance, args, kwargs):
        if before is not None:
            guarded(before, what, instance, args, kwargs)
        result = wrapped(*args, **kwargs)  # vLLM's own: its exceptions are its own
        if after is None:
            return result
        return guarded(after, what, result, instance, args, kwargs, default=result)

    wrapper.__vllm_overlap__ = True
    return wrapper


def wrap_function(
    function: Callable[..., Any],
    *,
    before: Callable[[Any, tuple, dict], None] | None = None,
    after: Callable[[Any, Any, tuple, dict], Any] | None = None,
    what: str,
) -> Callable[..., Any]:
    """``function`` with our steps around it: ``before(instance, args, kwargs)``, then the
    call, then ``after(result, instance, args, kwargs)`` (whose return value is the result)."""
    wrapped.append((getattr(function, "__module__", "?"), getattr(function, "__qualname__", "?")))
    return wrapt.FunctionWrapper(function, _wrapper(before, after, what))


def wrap(
    owner: Any,
    attribute: str,
    *,
    before: Callable[[Any, tuple, dict], None] | None = None,
    after: Callable[[Any, Any, tuple, dict], Any] | None = None,
    what: str,
) -> bool:
    """Wrap ``owner.<attribute>`` (a class's own method or a module's function) in place, once:
    True where it is wrapped (now, or already by us); False, wrapping nothing, where ``owner``
    does not define it itself (a release without it)."""
    original = vars(owner).get(attribute)
    if original is None:
        return False
    if is_ours(original):
        return True
    if isinstance(original, (staticmethod, classmethod)):  # keep the descriptor kind
        wrapped = type(original)(wrap_function(original.__func__, before=before, after=after, what=what))
    else:
        wrapped = wrap_function(original, before=before, after=after, what=what)
    setattr(owner, attribute, wrapped)
    return True


def is_ours(obj: Any) -> bool:
    """Whether ``obj`` is a wrapper this module made (not another plugin's)."""
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    inner = getattr(obj, "_self_wrapper", None) if isinstance(obj, wrapt.FunctionWrapper) else None
    return bool(getattr(inner, "__vllm_overlap__", False))
