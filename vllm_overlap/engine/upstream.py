"""Where upstream now overlaps a site's pair itself: the overlay steps aside there.

A site's "remove when" fact, checked rather than written: where a target's anchors no longer
match and the target calls one of vLLM's own fork/join primitives with every branch's
projection among its arguments (vLLM 0.34's GDN ``forward_cuda``: ``in_proj_ba`` on
``aux_stream()`` beside ``in_proj_qkvz`` through ``execute_in_parallel``), upstream forks the
same pair. The target is then ``upstream``, not ``skipped``: nothing to rewrite, nothing wrong,
and ``strict`` does not stop. Never two forks of one pair: the overlay rewrites nothing there.

Read from the source alone (ast, no torch, no vLLM), so ``compat`` and the live plugin agree.
"""

from __future__ import annotations

import ast
import textwrap

from vllm_overlap.engine.site import Site

# vLLM's own fork/join helpers (vllm.utils.multi_stream_utils).
PRIMITIVES = ("execute_in_parallel", "maybe_execute_in_parallel")
UPSTREAM_PREFIX = "upstream"


def branch_projections(site: Site) -> list[set[str]]:
    """Per branch of the site's newest form, the ``self.<name>`` modules it calls."""
    out = []
    for branch in site.forms[0].branches.values():
        tree = ast.parse(textwrap.dedent(branch.statements.replace("$", "_capture_")).strip())
        out.append({
            node.func.attr
            for node in ast.walk(tree)
            if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "self"
        })
    return out


def _primitive_name(call: ast.Call) -> str:
    func = call.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""


def _called_attributes(node: ast.AST) -> set[str]:
    return {
        n.func.attr
        for n in ast.walk(node)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
        and isinstance(n.func.value, ast.Name) and n.func.value.id == "self"
    }


def upstream_fork(function: ast.AST, site: Site) -> str | None:
    """How upstream forks the site's pair in ``function`` (None: it does not, or the site's
    branches cannot be read): a call of one of vLLM's fork/join primitives whose arguments call
    every branch's projections."""
    try:
        wanted = branch_projections(site)
    except SyntaxError:
        return None
    if any(not names for names in wanted):
        return None  # a branch that calls no projection of the layer: nothing to recognise
    for node in ast.walk(function):
        if isinstance(node, ast.Call) and _primitive_name(node) in PRIMITIVES:
            called = set().union(*(_called_attributes(arg) for arg in [*node.args, *(k.value for k in node.keywords)]))
            if all(names <= called for names in wanted):
                pair = " beside ".join("+".join(sorted(names)) for names in wanted)
                return f"{UPSTREAM_PREFIX}: vLLM forks {pair} itself ({_primitive_name(node)})"
    return None


def upstream_fork_in_source(source: str, site: Site) -> str | None:
    """:func:`upstream_fork` on a function's source text (None where it does not parse)."""
    try:
        tree = ast.parse(textwrap.dedent(source))
    except SyntaxError:
        return None
    return upstream_fork(tree, site)
