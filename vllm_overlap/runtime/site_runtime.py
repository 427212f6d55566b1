"""One site's runtime: the decision ladder, written once, over the branches compiled from
upstream's statements; and, for ``op`` sites, the generated custom op and fake kernel.

The ladder, in order (the first that holds decides):

1. the layer is not active (upstream's own condition is false): only the branches it does
   not guard run, as upstream; the guarded branch's result is None;
2. no second stream on this platform, a projection the branches call is LoRA-wrapped, or a
   linear layer they call is not stream-safe (``stream_safety``: its kernel keeps a
   per-device workspace, or is not on the allowlist), or the layer sits inside a class the
   site refuses (``refusals``): upstream's statements, serially, in upstream's order;
3. under torch.compile: an ``op`` site calls its custom op (Dynamo sees one opaque node),
   unless its layer is one the op could not find by name (then upstream's statements, with
   a warning); the others run upstream's statements (a ``plain`` site's code is never traced by vLLM; a
   ``serial`` site's fork would span a CUDA-graph splitting op);
4. otherwise the stream primitive: the current branch on the current stream beside the aux
   branch on vLLM's aux stream (beside each aux branch on an aux stream of its own, in a
   fan-out), within the configured token range (``streams.run_pair`` and ``run_many``
   decide the rest: no aux stream, breakable capture, DBO threads).

The op's real kernel runs step 4 on the layer its ``LayerName`` resolves to and checks each
output against what the fake kernel promised: ``like.new_empty((*like.shape[:-1], width))``,
contiguous (viewed as heads where the spec says so), the widths computed from the layer by
the outputs spec.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from vllm_overlap.config import active as active_config
from vllm_overlap.engine.branches import CompiledForm, compile_function
from vllm_overlap.engine.site import Site
from vllm_overlap.runtime import gates, refusals, stream_safety, streams
from vllm_overlap.runtime import layer_registry as layers

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
        from vllm_overlap.engine.rewrite import RewriteSkipped

        raise RewriteSkipped(
            "this vLLM has no vllm.utils.torch_utils.direct_register_custom_op: the site's op "
            "cannot be registered"
        ) from None

    direct_register_custom_op(name, func, mutates_args=[], fake_impl=fake, target_lib=library())


def output_shape(like: torch.Tensor, width: int, heads: int | None) -> tuple:
    """An op output's shape: ``like``'s leading dimensions, then ``width`` (or, with a head
    size, ``width`` viewed as ``(width // heads, heads)``)."""
    return (*like.shape[:-1], *((width,) if heads is None else (width // heads, heads)))


def check_output(
    out: torch.Tensor, like: torch.Tensor, width: int, what: str, heads: int | None = None
) -> torch.Tensor:
    """The real op must return exactly what the fake kernel promised."""
    expected = output_shape(like, width, heads)
    uneven = heads is not None and width % heads != 0
    if uneven or tuple(out.shape) != expected or out.dtype != like.dtype:
        raise RuntimeError(
            f"vllm-overlap: {what} returned {tuple(out.shape)} {out.dtype}, the fake kernel "
            f"promised {expected} {like.dtype} (width {width}, head size {heads}); turn this "
            "feature off and report it"
        )
    return out.contiguous()


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


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
        self.arities = tuple(b.arity for b in form.branches.values())
        self._op: Any = None
        if site.dynamo == "op":
            self._op = _make_op(self)
        self._untrusted = _callee_check(site) if site.callees else None
        # A user site: the hazard check of each new combination of argument aliasing and
        # shape class in this process (the combinations checked), and its finding.
        self._check_each = site.checked_at_first_run
        self._seen: set = set()
        self.off_reason = ""
        self._no_lora = _expression(site, list(site.no_lora), "no_lora") if site.no_lora else None
        # Per call, the ladder reads these instead of recomputing them (host time in eager
        # steps): the refusal mark's attribute name, and each op output's input index and name.
        self._refused = refusals.attribute(site.id)
        params = site.params[1:]
        self._outputs = tuple(
            (params.index(spec.like), f"{site.id} {spec.name}", bool(spec.heads)) for spec in site.outputs
        )

    # -- the ladder ---------------------------------------------------------------------------

    def __call__(self, *args):
        c = self.compiled
        site = self.site
        if c.active is not None and not c.active(args[0]):
            return site.result(*c.serial(*args, skip=c.gated))
        if not gates.overlap_possible():  # first: the projections are not needed to know it
            return site.result(*c.serial(*args))
        projections = c.projections(*args)
        if self._no_lora is not None:
            projections = (*projections, *self._no_lora(args[0]))
        if gates.any_lora(projections):
            return site.result(*c.serial(*args))
        if stream_safety.first_unsafe(projections):  # a kernel with a per-device workspace
            return site.result(*c.serial(*args))
        if self._refused_here(args[0]):  # reached from code the site was not proven in
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

    def _refused_here(self, layer) -> str:
        """``refusals.reason(layer, site id)`` as one dict read in eager steps: the mark lives
        in the layer's ``__dict__``, and a missing attribute on an nn.Module costs an
        AttributeError (microseconds). Under Dynamo, ``refusals.reason`` as it is."""
        marks = None if torch.compiler.is_compiling() else getattr(layer, "__dict__", None)
        if marks is None:
            return refusals.reason(layer, self.site.id)
        return marks.get(self._refused, "")

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

    def serial(self, *args) -> tuple:
        """Upstream's statements for these arguments: each branch's result (current, aux...)."""
        return self.compiled.serial(*args)

    def overlapped(self, *args) -> tuple:
        """Each branch's result (current, aux...) through the stream primitive: the pair's,
        or the fan-out's where the site has more than one aux branch. A user site's first
        run in the process (outside capture) is the hazard check instead, serially; a finding
        keeps it serial for the rest of the process. Until checked it never forks (a capture
        before any eager run records the serial statements)."""
        c = self.compiled
        if self.off_reason:
            return c.serial(*args)
        if self._check_each:  # never fork unchecked: serial during a capture, checked outside
            from vllm_overlap.runtime.hazards import combination

            key = combination(args)
            if key not in self._seen:
                return c.serial(*args) if _capturing() else self._first_run(key, *args)
        fns = [partial(fn, *args) for fn in c.branches.values()]
        tokens = args[self.tokens_index].shape[0]
        feature = active_config.site_config(self.site)
        if len(fns) == 2:
            return streams.run_pair(self.site.id, fns[0], fns[1], tokens, feature)
        first, rest = streams.run_many(self.site.id, fns[0], fns[1:], tokens, feature)
        return (first, *rest)

    @property
    def _checked(self) -> bool:
        return not self._check_each or bool(self._seen)

    def _first_run(self, key, *args) -> tuple:
        """The hazard check of a new combination of arguments: the branches serially under
        the recorder, and upstream's order with the moved statements on copies."""
        from vllm_overlap.log import logger
        from vllm_overlap.runtime.hazards import check_region, run_checked

        c = self.compiled
        first = not self._seen
        results, finding = run_checked({n: (lambda fn=fn: fn(*args)) for n, fn in c.branches.items()}, c.order)
        if finding is None and c.region is not None:
            finding = check_region(c.region, c.branches, args, c.region_pairs)
        self._seen.add(key)
        if finding:
            self.off_reason = f"hazard check: {finding}"
            logger().warning("vllm-overlap site %s: off for this process: %s", self.site.id, self.off_reason)
        elif first:
            logger().info(
                "vllm-overlap site %s: first run checked: no shared memory written, no collective", self.site.id
            )
        return tuple(results[n] for n in c.branches)

    # -- the op's pieces ------------------------------------------------------------------------

    def op_args(self, *args) -> tuple:
        """The op's arguments for the entry's: its tensors, each output's width on this rank,
        the head size of each output viewed as heads, and the layer's ``LayerName``."""
        layer = args[0]
        return (
            *args[1:],
            *self.widths(layer),
            *self.head_sizes(layer),
            layers.encode_layer_name(self.layer_name(layer)),
        )

    def widths(self, layer) -> tuple[int, ...]:
        return tuple(layers.per_rank_width(w) for w in self._widths(layer))

    def layer_name(self, layer) -> str:
        return self._layer_name(layer)

    def _unflatten(self, outs: tuple) -> tuple:
        """The op's flat outputs as each branch's result (current, aux...)."""
        results, i = [], 0
        for n in self.arities:
            results.append(outs[i] if n == 1 else tuple(outs[i : i + n]))
            i += n
        return tuple(results)

    def head_sizes(self, layer) -> tuple[int, ...]:
        """The head size of each output the spec views as heads, on this layer."""
        return tuple(int(h) for h in self._heads(layer))

    def _per_output(self, head_sizes: tuple[int, ...]) -> list[int | None]:
        sizes = iter(head_sizes)
        return [next(sizes) if spec.heads else None for spec in self.site.outputs]

    def op_outputs(self, layer, tensors: tuple, widths: tuple[int, ...], head_sizes: tuple[int, ...]) -> tuple:
        """The real op: overlapped on ``layer``, each output checked against the promise."""
        results = self.overlapped(layer, *tensors)
        outs = []
        for result, n in zip(results, self.arities):
            outs.extend(_flat(result, n))
        sizes = iter(head_sizes)
        return tuple(
            check_output(out, tensors[like], width, what, next(sizes) if heads else None)
            for out, (like, what, heads), width in zip(outs, self._outputs, widths)
        )

    def fake_outputs(self, tensors: tuple, widths: tuple[int, ...], head_sizes: tuple[int, ...]) -> tuple:
        params = self.site.params[1:]
        out = []
        for spec, width, heads in zip(self.site.outputs, widths, self._per_output(head_sizes)):
            like = tensors[params.index(spec.like)]
            out.append(like.new_empty(output_shape(like, width, heads)))
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
    rt._heads = _expression(site, [o.heads for o in site.outputs if o.heads], "heads")
    name_of = _expression(site, [site.layer_name_expr], "layer_name")
    rt._layer_name = lambda layer: name_of(layer)[0]
    tensors = site.params[1:]
    width_args = [f"{o.name}_width" for o in site.outputs]
    head_args = [f"{o.name}_heads" for o in site.outputs if o.heads]
    sig = ", ".join(
        [f"{t}: torch.Tensor" for t in tensors]
        + [f"{w}: int" for w in width_args + head_args]
        + ["layer_name: LayerNameType"]
    )
    returns = f"tuple[{', '.join(['torch.Tensor'] * len(site.outputs))}]"
    t, w, h = (", ".join(names) + ("," if names else "") for names in (tensors, width_args, head_args))
    text = (
        f"def {site.op}({sig}) -> {returns}:\n"
        f"    return _runtimes[{site.op!r}].op_outputs(resolve_layer(layer_name), ({t}), ({w}), ({h}))\n\n"
        f"def {site.op}_fake({sig}) -> {returns}:\n"
        f"    return _runtimes[{site.op!r}].fake_outputs(({t}), ({w}), ({h}))\n"
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
