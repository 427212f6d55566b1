"""A site's branches, gate and serial path, compiled from the upstream statements it matched.

The anchor is the single source of the serial path. When the engine has matched a form's
anchors in a target, :func:`compile_form` finds each branch's statements inside the matched
code, takes upstream's own lines for them, and compiles each into a function of the site's
parameters in the target module's globals, numbered as in the file they came from (a
traceback points at upstream's line). Running the branches in upstream's order *is* the
upstream computation: nothing here is a hand-kept copy.

Before anything is compiled it proves, from the code alone, what the overlap relies on:
- each branch lies inside the matched statements;
- each reads only the site's parameters, its own results, and the module's globals;
- no branch assigns a name another reads (so their order cannot matter);
- the declared "active" condition is an ``if`` test in the matched code that guards exactly
  one branch.
Anything else is ``RewriteSkipped`` with the reason: the target keeps upstream's code.

No torch here: this is the engine's side (ast and compile only).
"""

from __future__ import annotations

import ast
import builtins
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vllm_overlap.engine.rewrite import Anchor, RewriteSkipped, find_anchor, function_node
from vllm_overlap.engine.site import Branch, Form, Site
from vllm_overlap.engine.syntax import CAPTURE_RE, clashes, match, names_of, parse_anchor


@dataclass
class CompiledForm:
    """What :func:`compile_form` makes of one form in one target."""

    site: Site
    form_index: int
    branches: dict[str, Callable[..., Any]]  # by name, in the form's order: current, aux...
    order: tuple[str, ...]  # the branches in upstream's order
    active: Callable[[Any], Any] | None  # upstream's gate on the layer, or None
    gated: str | None  # the branch the gate guards
    projections: Callable[..., tuple]  # the modules the branches call (LoRA check)
    sources: dict[str, str]  # branch -> upstream's text of it
    # Upstream's matched statements in upstream's order, the branches called as functions and
    # the statements the rewrite moves after them inline, each marked as it starts (the
    # dynamic check of moved statements: ``region(mark, branches, *params)``); None where the
    # rewrite moves nothing or a moved statement reads what the site is not passed.
    region: Callable[..., None] | None = None
    region_pairs: tuple[tuple[str, str], ...] = ()  # (moved statement, branch it moves after)
    _in_order: Callable[[dict, tuple], tuple] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # made here, never on a first call: that call may be inside torch.compile's tracing,
        # which cannot trace compiling code
        self._in_order = _in_upstream_order(self)

    @property
    def current(self) -> Callable[..., Any]:
        return self.branches["current"]

    @property
    def aux(self) -> Callable[..., Any]:
        return self.branches["aux"]

    def serial(self, *args, skip: str | None = None) -> tuple:
        """Every branch's result (in the form's order), computed in upstream's order on one
        stream; the ``skip`` branch (an inactive layer's gated one) does not run: None."""
        if skip is None:  # the per-call path of every eager step: no dict built per call
            return self._in_order(self.branches, args)
        results = {name: None if name == skip else self.branches[name](*args) for name in self.order}
        return tuple(results[name] for name in self.branches)


def _in_upstream_order(compiled: CompiledForm) -> Callable[[dict, tuple], tuple]:
    """``f(branches, args)``: each branch (looked up in ``branches`` at each call, so a branch
    swapped in later runs) called in upstream's order, the results in the form's order."""
    slots = {name: f"r{i}" for i, name in enumerate(compiled.branches)}
    text = "def in_order(branches, args):\n"
    text += "".join(f"    {slots[name]} = branches[{name!r}](*args)\n" for name in compiled.order)
    text += f"    return ({''.join(slot + ', ' for slot in slots.values())})\n"
    return compile_function(text, "in_order", {}, f"<vllm-overlap {compiled.site.id} serial>", 1)


def _free_names(stmts: list[ast.stmt], defined: set[str]) -> set[str]:
    """Names read before this code assigns them (in statement order, into compound bodies)."""
    free: set[str] = set()
    for stmt in stmts:
        if isinstance(stmt, ast.If):
            free |= names_of(stmt.test, ast.Load) - defined
            body, orelse = set(defined), set(defined)
            free |= _free_names(stmt.body, body)
            free |= _free_names(stmt.orelse, orelse)
            defined |= body | orelse
            continue
        free |= names_of(stmt, ast.Load) - defined
        defined |= names_of(stmt, ast.Store)
    return free


def _returns(branch: Branch, captures: dict[str, str]) -> str:
    def bound(m) -> str:
        if m.group(1) not in captures:
            raise RewriteSkipped(f"branch returns unbound ${m.group(1)}")
        return captures[m.group(1)]

    return CAPTURE_RE.sub(bound, branch.returns)


def _within(stmts: list[ast.stmt], spans: list[tuple[int, int]]) -> bool:
    return any(a <= stmts[0].lineno and stmts[-1].end_lineno <= b for a, b in spans)


def compile_function(text: str, name: str, globals_: dict, filename: str, line: int) -> Callable:
    """``text`` (one def) compiled with its def on ``line`` of ``filename``."""
    namespace: dict[str, Any] = {}
    exec(compile("\n" * (line - 1) + text, filename, "exec"), globals_, namespace)
    return namespace[name]


def compile_form(
    site: Site,
    form_index: int,
    source: str,
    func_globals: dict,
    filename: str,
    first_lineno: int,
) -> CompiledForm:
    """Compile ``site.forms[form_index]`` from ``source`` (the function text the engine matched
    it in; line 1 of it is line ``first_lineno`` of ``filename``)."""
    form: Form = site.forms[form_index]
    source = textwrap.dedent(source)
    func = function_node(source)
    lines = source.splitlines(keepends=True)
    spans = [
        (m.stmts[0].lineno, m.stmts[-1].end_lineno)
        for anchor in form.anchors
        for m in find_anchor(func, anchor)
    ]
    matched = _Matched(site, func, lines, spans, func_globals, filename, first_lineno)
    found = {which: _compile_branch(matched, which, branch) for which, branch in form.branches.items()}
    _check_independent(site, found)
    order = tuple(sorted(found, key=lambda w: found[w]["match"].stmts[0].lineno))
    active, gated = None, None
    if form.active:
        active, gated = _gate(site, form, func, found, func_globals, filename, first_lineno)
    projections = _projections(site, found, func_globals, filename, first_lineno)
    region, pairs = _region(site, form, func, lines, found, func_globals, filename, first_lineno)
    return CompiledForm(
        site,
        form_index,
        {w: found[w]["fn"] for w in found},
        order,
        active,
        gated,
        projections,
        {w: found[w]["text"] for w in found},
        region,
        pairs,
    )


@dataclass(frozen=True)
class _Matched:
    """Where a form's branches are compiled from: the function the engine matched the form's
    anchors in, its lines, the matched spans, and where its code lives."""

    site: Site
    func: ast.AST
    lines: list[str]
    spans: list[tuple[int, int]]
    func_globals: dict
    filename: str
    first_lineno: int


def _compile_branch(matched: _Matched, which: str, branch: Branch) -> dict[str, Any]:
    """One branch of the form: its statements inside the matched code, compiled into a function
    of the site's parameters; refused if it reads anything it is not passed."""
    site = matched.site
    params = set(site.params)
    known = set(matched.func_globals) | set(vars(builtins))
    matches = [m for m in find_anchor(matched.func, Anchor(branch.statements, "")) if _within(m.stmts, matched.spans)]
    if not matches:
        raise RewriteSkipped(f"{site.id}: the {which} branch's statements are not in the matched code")
    hit = matches[0]
    first, last = hit.stmts[0], hit.stmts[-1]
    body = textwrap.dedent("".join(matched.lines[first.lineno - 1 : last.end_lineno]))
    returns = _returns(branch, hit.captures)
    fname = f"{site.id}__{which}"
    text = f"def {fname}({', '.join(site.params)}):\n" + textwrap.indent(body, "    ")
    text += f"    return {returns}\n"
    tree = function_node(text)
    free = _free_names(tree.body, set())  # the parameters included: what it reads of them
    unknown = sorted(free - params - known)
    if unknown:
        raise RewriteSkipped(
            f"{site.id}: the {which} branch reads {', '.join(unknown)}, which it is not passed"
        )
    calls = [
        ast.unparse(n.func)
        for s in hit.stmts
        for n in ast.walk(s)
        if isinstance(n, ast.Call) and _root(n.func) in params
    ]
    line = matched.first_lineno + first.lineno - 2
    return dict(
        match=hit,
        fn=compile_function(text, fname, matched.func_globals, matched.filename, line),
        reads=free & params,
        stores=set().union(*(names_of(s, ast.Store) for s in tree.body)),
        calls=calls,
        text=body,
        returns=returns,
    )


def _check_independent(site: Site, found: dict[str, dict[str, Any]]) -> None:
    """No branch assigns a name another reads: refused otherwise."""
    stores = {w: found[w]["stores"] for w in found}
    reads = {w: found[w]["reads"] for w in found}
    for a, b, clash in clashes(stores, reads):
        raise RewriteSkipped(
            f"{site.id}: the {a} branch assigns {', '.join(sorted(clash))}, which the {b} "
            "branch reads: not independent"
        )


def _projections(site: Site, found: dict[str, dict[str, Any]], func_globals, filename, first_lineno):
    """The function of the site's parameters returning the modules the branches call."""
    calls = list(dict.fromkeys(c for w in found for c in found[w]["calls"]))
    return compile_function(
        f"def {site.id}__projections({', '.join(site.params)}):\n"
        f"    return ({''.join(c + ', ' for c in calls)})\n",
        f"{site.id}__projections",
        func_globals,
        filename,
        first_lineno,
    )


def _region(site, form, func, lines, found, func_globals, filename, first_lineno):
    """The function of the matched statements in upstream's order (see ``CompiledForm.region``)
    and the (moved statement, branch) pairs whose order the rewrite swaps."""
    matches = find_anchor(func, form.anchors[0]) if len(form.anchors) == 1 else []
    if len(matches) != 1:
        return None, ()
    owner = {id(s): w for w in found for s in found[w]["match"].stmts}
    params = ", ".join(site.params)
    body, labels = [], []
    for stmt in matches[0].stmts:
        which = owner.get(id(stmt))
        if which in labels:
            continue
        if which is not None:
            labels.append(which)
            body += [f"__mark({which!r})", f"{found[which]['returns']} = __branches[{which!r}]({params})"]
            continue
        text = textwrap.dedent("".join(lines[stmt.lineno - 1 : stmt.end_lineno]))
        label = f"moved statement `{text.splitlines()[0].strip()}`"
        labels.append(label)
        body += [f"__mark({label!r})", *text.rstrip("\n").splitlines()]
    moved = [label for label in labels if label not in found]
    if not moved:
        return None, ()
    name = f"{site.id}__region"
    text = f"def {name}(__mark, __branches, {params}):\n"
    text += textwrap.indent("\n".join([*body, "__mark(None)"]), "    ") + "\n"
    free = _free_names(function_node(text).body, set()) - {"__mark", "__branches"}
    if free - set(site.params) - set(func_globals) - set(vars(builtins)):
        return None, ()
    pairs = tuple((m, w) for i, m in enumerate(labels) if m in moved for w in labels[i + 1 :] if w in found)
    return compile_function(text, name, func_globals, filename, first_lineno), pairs


def _root(node: ast.AST) -> str | None:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def _gate(site, form, func, found, func_globals, filename, first_lineno):
    pattern = parse_anchor(form.active)
    if len(pattern) != 1 or not isinstance(pattern[0], ast.Expr):
        raise RewriteSkipped(f"{site.id}: active must be one expression")
    guarded = []
    for node in ast.walk(func):
        if isinstance(node, ast.If) and match(pattern[0].value, node.test, {}):
            for which in found:
                if any(s is found[which]["match"].stmts[0] for s in node.body):
                    guarded.append((which, node))
    if len(guarded) != 1:
        raise RewriteSkipped(
            f"{site.id}: upstream's condition `{form.active}` guards {len(guarded)} branches, "
            "expected 1"
        )
    which, node = guarded[0]
    layer = site.params[0]
    unknown = sorted(names_of(node.test, ast.Load) - {layer} - set(func_globals) - set(vars(builtins)))
    if unknown:
        raise RewriteSkipped(f"{site.id}: the active condition reads {', '.join(unknown)}")
    text = f"def {site.id}__active({layer}):\n    return {ast.unparse(node.test)}\n"
    fn = compile_function(text, f"{site.id}__active", func_globals, filename, first_lineno + node.lineno - 2)
    return fn, which
