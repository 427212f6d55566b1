"""What an overlap site is: a declaration, no torch.

A *site* is one place in upstream functions where two (or more) statement groups are
independent and can run on as many streams. Everything else is built from its declaration: the rewrite
(``Form.anchors``), the serial path and the two branches (compiled from the upstream
statements the anchors matched, ``vllm_overlap.engine.branches``), the decision ladder, the custom
op and its fake kernel (``vllm_overlap.runtime``), the config, doctor's rows, the site
table and facts of docs/sites.md, ``patches/*.diff`` and ``compat``. A *feature* (the config key) groups sites.

``register()`` reads these in every vLLM process, the API server included, where nothing heavy
may be imported: this module and the declarations import no torch and no vLLM.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from vllm_overlap.engine.rewrite import Anchor, Target

# In a replacement text, the name through which the rewritten code calls the site's runtime:
# the engine puts the feature's injected global there (``Feature.runtime_global``).
SITE_NAME = "__site__"
_CALL_RE = re.compile(rf"\b{SITE_NAME}\.([A-Za-z_][A-Za-z0-9_]*)\(")


@dataclass(frozen=True)
class Branch:
    """Statements of the form that run together on one stream, and what they produce.

    ``statements`` is anchor text (``$name`` captures allowed) that must occur inside the
    statements the form's anchors matched; the branch runs upstream's own lines found there,
    never this text. ``returns`` names the results (``$captures`` allowed): one expression,
    or several separated by commas."""

    statements: str
    returns: str

    @property
    def arity(self) -> int:
        """How many values the branch returns (1 for a single expression)."""
        node = ast.parse(self.returns.replace("$", "_capture_"), mode="eval").body
        return len(node.elts) if isinstance(node, ast.Tuple) else 1


@dataclass(frozen=True)
class Form:
    """One way upstream writes the site's statements (the newest release's first)."""

    anchors: tuple[Anchor, ...]
    current: Branch  # on the current stream
    # On the aux stream; several (a fan-out): each on an aux stream of its own, named "aux",
    # "aux2", "aux3"... in this order.
    aux: Branch | tuple[Branch, ...]
    # Upstream's own "this layer is active" condition: an ``if`` test in the matched code that
    # guards one of the branches. Where it is false only the others run, and the guarded
    # one's result is None, as upstream's else-path has it.
    active: str = ""

    @property
    def branches(self) -> dict[str, Branch]:
        """Every branch by name: "current", then "aux" (and "aux2", "aux3"... in a fan-out)."""
        aux = self.aux if isinstance(self.aux, tuple) else (self.aux,)
        names = ["aux", *(f"aux{i}" for i in range(2, len(aux) + 1))]
        return {"current": self.current, **dict(zip(names, aux))}


@dataclass(frozen=True)
class Output:
    """One output of an ``op`` site's custom op, in the order of the branches (current, aux,
    aux2...).

    The fake kernel returns ``like.new_empty((*like.shape[:-1], width))`` for each, contiguous;
    ``like`` is an entry parameter, ``width`` an expression on the layer: a linear layer (its
    per-rank width, set at init, never read from weights that quantisation may repack) or an
    int attribute. With ``heads`` (an int expression on the layer: a head size), the last
    dimension is viewed as ``(width // heads, heads)``, as a branch that ends in such a view
    returns it."""

    name: str
    like: str
    width: str
    heads: str = ""


@dataclass(frozen=True)
class Facts:
    why: str
    how: str
    upstream: str
    remove_when: str

    def rows(self) -> dict[str, str]:
        return {
            "Why": self.why,
            "How": self.how,
            "Upstream": self.upstream,
            "Remove when": self.remove_when,
        }


@dataclass(frozen=True)
class Callee:
    """A whole module a branch calls (not a projection): the site overlaps only where it is
    an instance of ``module.qualname`` whose forward is that class's (the statements the site
    was checked with), never another model's module reached through the same attribute."""

    expr: str  # on the layer, e.g. "self.indexer"
    module: str
    qualname: str


@dataclass(frozen=True)
class Refusal:
    """Where the site's layer is reached from code no test has run: every layer of the site
    inside an instance of ``module.qualname`` runs upstream's statements, and the census gives
    ``reason``. Marked after loading (``runtime.refusals``); a release without the class has no
    such instances."""

    module: str
    qualname: str
    reason: str


@dataclass(frozen=True)
class ModeEntry:
    """What a config mode other than dual_stream calls instead of the site's entry:
    ``factory`` ("module:function") makes the callable from the site's runtime."""

    entry: str
    factory: str


def _results(*results: Any) -> tuple[Any, ...]:
    return results


@dataclass(frozen=True)
class Site:
    id: str
    feature: str
    summary: str  # one line: what runs beside what
    targets: tuple[Target, ...]
    forms: tuple[Form, ...]  # newest first; older releases' statements after
    entry: str  # what the replacement calls: ``__site__.<entry>(<params>)``
    params: tuple[str, ...]  # the entry's parameters; the first is the layer
    tokens: str  # the parameter whose first dimension is the token count
    # Under torch.compile: "op" calls the generated custom op; "plain" code never runs under
    # Dynamo (if it ever does, upstream's statements run); "serial" runs upstream's statements.
    dynamo: Literal["op", "plain", "serial"]
    facts: Facts
    outputs: tuple[Output, ...] = ()  # "op" sites only
    op_name: str = ""  # "op" sites: torch.ops.vllm_overlap.<op_name> (default: the site id)
    layer_name_expr: str = "self.prefix"  # how an op finds its layer again (LayerName)
    # Where several sites rewrite one target: lower applies first (then declaration order).
    stack: int = 0
    # The op's layer is not in vLLM's forward context: every instance of the target's class
    # registers itself under ``layer_name_expr`` as it is built (``layers.register_instances``).
    registry: bool = False
    # What the entry returns, from the branches' results (current, aux, aux2...).
    result: Callable[..., Any] = _results
    modes: tuple[tuple[str, ModeEntry], ...] = ()
    callees: tuple[Callee, ...] = ()  # eager sites only (checked outside torch.compile)
    refused_inside: tuple[Refusal, ...] = ()
    # Upstream's condition, on the layer, for its forward to take the path that holds the
    # site's statements (empty: always). The census counts a layer where it is false as not
    # reaching the site (e.g. "not self.separate_b_proj": such layers run other statements).
    reached_when: str = ""
    # A user site: its first run in each process (outside capture) goes through the hazard
    # check (``runtime.hazards``), which turns it off for the process on any finding.
    checked_at_first_run: bool = False
    # Further modules on the layer (expressions) whose LoRA wrapping makes the site serial.
    no_lora: tuple[str, ...] = ()
    # The layer attribute holding the bound method its forward dispatches to on this platform
    # (e.g. "_forward_method": forward_cuda, forward_cpu...). With it, the census counts a
    # layer by the function that runs here, never by its class: a layer whose running method
    # is not rewritten runs upstream's statements.
    dispatch: str = ""
    # Where a target is upstream's own fork of the pair (``outcomes.UPSTREAM``): "module:function"
    # called as ``f(layer, compiled, aux_stream) -> (overlaps, why)`` after loading, which may
    # turn upstream's own mechanism on for the layer (``runtime.gdn_upstream.settle``).
    upstream_switch: str = ""

    @property
    def op(self) -> str:
        return self.op_name or self.id

    def traced_differs(self, mode: str = "dual_stream") -> bool:
        """Whether torch.compile traces other code once this site is applied (its custom op, or
        a mode's other computation): such a site needs the overlay's compile-cache key. A
        ``plain`` or ``serial`` site runs upstream's statements under Dynamo."""
        return self.dynamo == "op" or mode != "dual_stream"

    def anchor_sets(self, runtime_global: str, mode: str = "dual_stream"):
        """Each form's anchors with the replacement calling ``runtime_global`` (and, in a
        mode with an entry of its own, that entry)."""
        entry = dict(self.modes)[mode].entry if mode in dict(self.modes) else self.entry

        def concrete(anchor: Anchor) -> Anchor:
            text = anchor.replace.replace(f"{SITE_NAME}.{self.entry}(", f"{SITE_NAME}.{entry}(")
            return Anchor(anchor.find, text.replace(SITE_NAME, runtime_global), anchor.count)

        return tuple(tuple(concrete(a) for a in form.anchors) for form in self.forms)

    def problems(self) -> list[str]:
        """What is wrong with this declaration (empty: nothing)."""
        out = []
        for name, text in self.facts.rows().items():
            if not text.strip():
                out.append(f"{self.id}: no {name!r} fact")
        if not self.targets or not self.forms:
            out.append(f"{self.id}: no targets or no forms")
        for i, form in enumerate(self.forms):
            calls = [c for a in form.anchors for c in _CALL_RE.findall(a.replace)]
            if calls != [self.entry]:
                out.append(
                    f"{self.id} form {i}: replacements call {calls}, expected one call of " f"{SITE_NAME}.{self.entry}"
                )
            if any("_vllm_overlap_" + self.feature in a.replace for a in form.anchors):
                out.append(f"{self.id} form {i}: names the injected global by hand")
            if list(form.branches) != list(self.forms[0].branches):
                out.append(
                    f"{self.id} form {i}: branches {list(form.branches)}, form 0 has {list(self.forms[0].branches)}"
                )
        if self.dynamo == "op":
            arity = sum(b.arity for b in self.forms[0].branches.values())
            if len(self.outputs) != arity:
                out.append(f"{self.id}: {len(self.outputs)} outputs declared, branches return {arity}")
            for o in self.outputs:
                if o.like not in self.params[1:]:
                    out.append(f"{self.id}: output {o.name} is like {o.like!r}, not a parameter")
        if self.callees and self.dynamo == "op":
            out.append(f"{self.id}: callees are checked on the eager path; an op site has none")
        if self.tokens not in self.params:
            out.append(f"{self.id}: tokens {self.tokens!r} is not a parameter")
        return out


@dataclass(frozen=True)
class Rewrite:
    """The anchors to replace in one target function (one code shape of a site)."""

    target: Target
    anchors: tuple[Anchor, ...]
    # The same statements as older vLLM releases wrote them: anchor sets tried in turn when
    # ``anchors`` (the newest release's) do not match.
    older: tuple[tuple[Anchor, ...], ...] = ()
    site: str = ""

    @property
    def anchor_sets(self) -> tuple[tuple[Anchor, ...], ...]:
        return (self.anchors, *self.older)


@dataclass(frozen=True)
class Feature:
    """A config key: the sites it switches on together, and what they share."""

    name: str
    summary: str  # one line: what runs beside what
    sites: tuple[Site, ...]
    settings: type  # its pydantic settings model (``vllm_overlap.engine.settings``)
    # Modes other than dual_stream (sites declare what each mode calls).
    extra_modes: tuple[str, ...] = ()
    # Run after the model's weights are loaded, before vLLM post-processes them:
    # "module:function" called with the model, in the modes listed in post_load_modes.
    post_load: str = ""
    post_load_modes: tuple[str, ...] = ()
    # Whether a model can use the feature, from its Hugging Face config alone (attribute
    # reads, no imports): None if it can, else the reason. ``vllm-overlap doctor --model``.
    model_check: Callable[[Any], str | None] | None = None
    site_ids: tuple[str, ...] = field(init=False, default=())

    def __post_init__(self):
        object.__setattr__(self, "site_ids", tuple(s.id for s in self.sites))

    @property
    def runtime_global(self) -> str:
        """The name under which the rewritten code sees the feature's runtime."""
        return f"_vllm_overlap_{self.name}"

    @property
    def modes(self) -> tuple[str, ...]:
        return ("dual_stream", *self.extra_modes)

    def rewrites_for(self, mode: str = "dual_stream") -> tuple[Rewrite, ...]:
        out = []
        for site in self.sites:
            first, *older = site.anchor_sets(self.runtime_global, mode)
            out += [Rewrite(t, first, tuple(older), site.id) for t in site.targets]
        return tuple(out)

    @property
    def rewrites(self) -> tuple[Rewrite, ...]:
        return self.rewrites_for()

    def modules(self) -> list[str]:
        return sorted({t.module for s in self.sites for t in s.targets})

    def rewrites_in(self, module: str, mode: str = "dual_stream") -> list[Rewrite]:
        return [r for r in self.rewrites_for(mode) if r.target.module == module]

    def site(self, site_id: str) -> Site:
        return next(s for s in self.sites if s.id == site_id)

    def with_anchors(self, *anchors: Anchor) -> "Feature":
        """This feature with every form of every site matching ``anchors`` instead (tests:
        a declaration that no longer fits the code)."""
        sites = tuple(replace(s, forms=tuple(replace(f, anchors=anchors) for f in s.forms)) for s in self.sites)
        return replace(self, sites=sites)


def text_config(hf_config: Any) -> Any:
    """The language model's config of a (possibly multimodal) Hugging Face config."""
    get = getattr(hf_config, "get_text_config", None)
    return get() if callable(get) else hf_config
