"""A stand-in for a kernel, called exactly as the kernel is, written by what the kernel means.

``standin(real, body, calls, name)`` returns a function with ``real``'s own parameters (names,
order, kinds and defaults, generated from its signature), which counts the call and hands every
argument to ``body`` by keyword. The body names only the arguments its meaning needs and takes
the rest as ``**_`` (or all of them, in order, as ``**tensors``): it never copies a long
signature by hand, and a call that the kernel would refuse (an unknown keyword, a missing
argument) the stand-in refuses too. When upstream renames or drops an argument the body reads,
building the stand-in fails with the name, not a confusing result later.

The generated function is plain Python (no ``inspect`` at call time), so Dynamo traces it.
"""

from __future__ import annotations

import inspect
import re
from collections import Counter
from collections.abc import Callable
from typing import Any

_VARIADIC = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


def _required_names(body: Callable) -> list[str]:
    """The parameters ``body`` must be given by name (no default, not ``**``)."""
    return [
        p.name
        for p in inspect.signature(body).parameters.values()
        if p.kind not in _VARIADIC and p.default is inspect.Parameter.empty
    ]


def standin(real: Callable, body: Callable[..., Any], calls: Counter, name: str) -> Callable:
    """``real``'s signature around ``body(**arguments)``, counted in ``calls[name]``."""
    params = list(inspect.signature(real).parameters.values())
    if any(p.kind in _VARIADIC for p in params):
        raise TypeError(f"{name}: {real!r} takes *args or **kwargs; stand in for it by hand")
    names = [p.name for p in params]
    missing = [n for n in _required_names(body) if n not in names]
    if missing:
        raise TypeError(f"{name}: the stand-in reads {missing}, which {real!r} does not take")

    spec, defaults, keyword_only_started = [], {}, False
    for p in params:
        if p.kind is inspect.Parameter.KEYWORD_ONLY and not keyword_only_started:
            spec.append("*")
            keyword_only_started = True
        text = p.name
        if p.default is not inspect.Parameter.empty:
            defaults[p.name] = p.default
            text += f"=_defaults[{p.name!r}]"
        spec.append(text)
        if p.kind is inspect.Parameter.POSITIONAL_ONLY and (
            p is params[-1] or params[params.index(p) + 1].kind is not inspect.Parameter.POSITIONAL_ONLY
        ):
            spec.append("/")
    func = "standin_" + re.sub(r"\W", "_", name)
    source = (
        f"def {func}({', '.join(spec)}):\n"
        f"    _calls[{name!r}] += 1\n"
        f"    return _body({', '.join(f'{n}={n}' for n in names)})\n"
    )
    namespace = {"_defaults": defaults, "_calls": calls, "_body": body}
    exec(compile(source, f"<stand-in {name}>", "exec"), namespace)
    return namespace[func]
