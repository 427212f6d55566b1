"""One site's runtime: the decision ladder, written once, over the branches compiled from
upstream's statements; and, for ``op`` sites, the generated custom op and fake kernel.

The ladder, in order (the first that holds decides):

1. the layer is not active (upstream's own condition is false): only the branch it does not
   guard runs, as upstream; the guarded branch's result is None;
2. no second stream on this platform, a projection the branches call is LoRA-wrapped, or a
   linear layer they call is not stream-safe (``stream_safety``: its kernel keeps a
   per-device workspace, or is not on the allowlist), or the layer sits inside a class the
   site refuses (``refusals``): upstream's statements, serially, in upstream's order;
3. under torch.compile: an ``op`` site calls its custom op (Dynamo sees one opaque node),
   unless its layer is one the op could not find by name (then upstream's statements, with
   a warning); the others run upstream's statements (a ``plain`` site's code is never traced by vLLM; a
   ``serial`` site's fork would span a CUDA-graph splitting op);
4. otherwise the stream primitive: the current branch on the current stream beside the aux
   branch on vLLM's aux stream, within the configured token range (``streams.run_pair``
   decides the rest: no aux stream, breakable capture, DBO threads).

The op's real kernel runs step 4 on the layer its ``LayerName`` resolves to and checks each
output against what the fake kernel promised: ``like.new_empty((*like.shape[:-1], width))``,
contiguous, the widths computed from the layer by the outputs spec.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .. import active_config, streams
from ..branches import CompiledForm, compile_function
from ..site import Site
from . import gates, layers, refusals, stream_safety

LIBRARY_NAME = "vllm_overlap"
_library: torch.library.Library | None = None


def library() -> torch.library.Library:
    global _library
    if _library is None:
        _library = torch.library.Library(LIBRARY_NAME, "FRAGMENT")
    return _library


def has_op(name: str) -> bool:
    return hasattr(torch.ops, LIBRARY_NAME) and hasattr(getattr(torch.ops, LIBRARY_NAME), name)


def register_op(name: str, func: Callable, fake: Callable) -> None:
    """Register ``torch.ops.vllm_overlap.<name>`` once per process (idempotent)."""
    if has_op(name):
        return
    try:
        from vllm.utils.torch_utils import direct_register_custom_op
    except ImportError:
        from ..rewrite import RewriteSkipped

        raise RewriteSkipped(
            "this vLLM has no vllm.utils.torch_utils.direct_register_custom_op: the site's op "
            "cannot be registered"
        ) from None

    direct_register_custom_op(name, func, mutates_args=[], fake_impl=fake, target_lib=library())


def check_output(out: torch.Tensor, like: torch.Tensor, width: int, what: str) -> torch.Tensor:
    """The real op must return exactly what the fake kernel promised."""
    expected = (*like.shape[:-1], width)
    if tuple(out.shape) != expected or out.dtype != like.dtype:
        raise RuntimeError(
            f"vllm-overlap: {what} returned {tuple(out.shape)} {out.dtype}, the fake kernel "
            f"promised {expected} {like.dtype}; turn this feature off and report it"
        )
    return out.contiguous()


def _flat(value: Any, arity: int) -> tuple:
    return tuple(value) if arity > 1 else (value,)


class SiteRuntime:
    """The callable a rewritten target reaches as ``_vllm_overlap_<feature>.<entry>``."""

    def __init__(self, compiled: CompiledForm):
        site: Site = compiled.site
        self.site = site
        self.compiled = compiled
        self.tokens_index = site.params.index(site.tokens)
        form = site.forms[compiled.form_index]
        self.arities = (form.current.arity, form.aux.arity)
        self._op: Any = None
        if site.dynamo == "op":
            self._op = _make_op(self)
        self._untrusted = _callee_check(site) if site.callees else None

    # -- the ladder ---------------------------------------------------------------------------

    def __call__(self, *args):
        c = self.compiled
        site = self.site
        if c.active is not None and not c.active(args[0]):
            if c.gated == "current":
                return site.result(None, c.aux(*args))
            return site.result(c.current(*args), None)
        projections = c.projections(*args)
        if not gates.overlap_possible() or gates.any_lora(projections):
            return site.result(*c.serial(*args))
        if stream_safety.first_unsafe(projections):  # a kernel with a per-device workspace
            return site.result(*c.serial(*args))
        if refusals.reason(args[0], site.id):  # reached from code the site was not proven in
            return site.result(*c.serial(*args))
        if torch.compiler.is_compiling():
            if self._op is not None and self._findable(args[0]):  # one opaque op, not streams
                return site.result(*self._unflatten(self._op(*self.op_args(*args))))
            return site.result(*c.serial(*args))
        if self._untrusted is not None and self._untrusted(args[0]):
            return site.result(*c.serial(*args))  # another model's module: not proven
        # Eager: the op's body without the dispatcher round trip and without the output
        # check, which guards the fake kernel's promise to compiled graphs.
        return site.result(*self.overlapped(*args))

    def untrusted_callee(self, layer) -> str:
        """Why a module the branches call on ``layer`` is not the one the site declares
        ("" if every one is)."""
        return self._untrusted(layer) if self._untrusted is not None else ""

    def _findable(self, layer) -> bool:
        """Whether the op will find ``layer`` by name: a ``registry`` site's layer must be in
        the overlay's registry, else upstream's statements are traced instead (with a warning),
        never a KeyError in the forward pass."""
        if not self.site.registry or layers.is_registered(layer):
            return True
        layers.warn_unregistered(self.site.id, self.layer_name(layer))
        return False

    def serial(self, *args):
        """Upstream's statements for these arguments: (current result, aux result)."""
        return self.compiled.serial(*args)

    def overlapped(self, *args):
        """(current result, aux result) through the stream primitive."""
        c = self.compiled
        return streams.run_pair(
            self.site.id,
            lambda: c.current(*args),
            lambda: c.aux(*args),
            args[self.tokens_index].shape[0],
            active_config.site_config(self.site),
        )

    # -- the op's pieces ------------------------------------------------------------------------

    def op_args(self, *args) -> tuple:
        """The op's arguments for the entry's: its tensors, each output's width on this rank,
        and the layer's ``LayerName``."""
        layer = args[0]
        return (*args[1:], *self.widths(layer), layers.encode_layer_name(self.layer_name(layer)))

    def widths(self, layer) -> tuple[int, ...]:
        return tuple(layers.per_rank_width(w) for w in self._widths(layer))

    def layer_name(self, layer) -> str:
        return self._layer_name(layer)

    def _unflatten(self, outs: tuple) -> tuple[Any, Any]:
        n = self.arities[0]
        current = outs[0] if n == 1 else tuple(outs[:n])
        aux = outs[n] if self.arities[1] == 1 else tuple(outs[n:])
        return current, aux

    def op_outputs(self, layer, tensors: tuple, widths: tuple[int, ...]) -> tuple:
        """The real op: overlapped on ``layer``, each output checked against the promise."""
        current, aux = self.overlapped(layer, *tensors)
        outs = _flat(current, self.arities[0]) + _flat(aux, self.arities[1])
        params = self.site.params[1:]
        return tuple(
            check_output(out, tensors[params.index(spec.like)], width, f"{self.site.id} {spec.name}")
            for out, spec, width in zip(outs, self.site.outputs, widths)
        )

    def fake_outputs(self, tensors: tuple, widths: tuple[int, ...]) -> tuple:
        params = self.site.params[1:]
        out = []
        for spec, width in zip(self.site.outputs, widths):
            like = tensors[params.index(spec.like)]
            out.append(like.new_empty((*like.shape[:-1], width)))
        return tuple(out)


# op name -> the runtime its kernels use (registration is once per process; a site applied
# again, after a revert, serves the same op with its new runtime).
_op_runtimes: dict[str, SiteRuntime] = {}


def _expression(site: Site, exprs: list[str], what: str) -> Callable:
    """A function of the layer computing ``exprs`` (declared on the site, not upstream code)."""
    name = f"{site.id}__{what}"
    text = f"def {name}({site.params[0]}):\n    return ({''.join(e + ', ' for e in exprs)})\n"
    return compile_function(text, name, {}, f"<vllm-overlap {site.id} {what}>", 1)


def _callee_check(site: Site) -> Callable[[Any], str]:
    """A function of the layer: why a declared callee is not the declared class's forward."""
    import sys

    values = _expression(site, [callee.expr for callee in site.callees], "callees")

    def untrusted(layer) -> str:
        for callee, obj in zip(site.callees, values(layer)):
            cls = getattr(sys.modules.get(callee.module), callee.qualname, None)
            if cls is None or not isinstance(obj, cls) or type(obj).forward is not cls.forward:
                return (
                    f"calls {type(obj).__name__}, not {callee.module}.{callee.qualname}: "
                    "not proven"
                )
        return ""

    return untrusted


def _make_op(rt: SiteRuntime):
    """Register the site's op (once per process) and return its overload packet."""
    site = rt.site
    widths = _expression(site, [o.width for o in site.outputs], "widths")
    rt._widths = widths
    name_of = _expression(site, [site.layer_name_expr], "layer_name")
    rt._layer_name = lambda layer: name_of(layer)[0]
    tensors = site.params[1:]
    width_args = [f"{o.name}_width" for o in site.outputs]
    sig = ", ".join(
        [f"{t}: torch.Tensor" for t in tensors]
        + [f"{w}: int" for w in width_args]
        + ["layer_name: LayerNameType"]
    )
    returns = f"tuple[{', '.join(['torch.Tensor'] * len(site.outputs))}]"
    t, w = ", ".join(tensors) + ",", ", ".join(width_args) + ","
    text = (
        f"def {site.op}({sig}) -> {returns}:\n"
        f"    return _runtimes[{site.op!r}].op_outputs(resolve_layer(layer_name), ({t}), ({w}))\n\n"
        f"def {site.op}_fake({sig}) -> {returns}:\n"
        f"    return _runtimes[{site.op!r}].fake_outputs(({t}), ({w}))\n"
    )
    namespace = {
        "torch": torch,
        "LayerNameType": layers.LayerNameType,
        "resolve_layer": layers.resolve_layer,
        "_runtimes": _op_runtimes,
    }
    _op_runtimes[site.op] = rt  # the newest runtime of the site serves the op
    exec(compile(text, f"<vllm-overlap op {site.op}>", "exec"), namespace)
    register_op(site.op, namespace[site.op], namespace[f"{site.op}_fake"])
    return getattr(getattr(torch.ops, LIBRARY_NAME), site.op)
