"""Syntax-tree helpers the engine's modules share: anchors parsed with their ``$name``
captures, statements compared as normalised AST, statement lists, the names code reads and
writes, and the read/write clash between groups of statements.

No torch, no imports of the package: ast and re only.
"""

from __future__ import annotations

import ast
import re
import textwrap
from collections.abc import Iterator, Mapping
from typing import Any

CAPTURE_PREFIX = "__vllm_overlap_capture_"
# ``$name`` in an anchor: matches any identifier and binds it.
CAPTURE_RE = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")


def parse_anchor(text: str) -> list[ast.stmt]:
    """The statements of an anchor's text, each ``$name`` turned into a capture name."""
    src = CAPTURE_RE.sub(lambda m: CAPTURE_PREFIX + m.group(1), textwrap.dedent(text).strip())
    return ast.parse(src).body


def match(pattern: Any, node: Any, captures: dict[str, str]) -> bool:
    """Whether ``node`` is ``pattern`` (AST, lists of AST, or plain values), a capture name
    in the pattern matching any one name, bound in ``captures`` (the same name each time)."""
    if isinstance(pattern, ast.Name) and pattern.id.startswith(CAPTURE_PREFIX):
        if not isinstance(node, ast.Name):
            return False
        bound = captures.setdefault(pattern.id[len(CAPTURE_PREFIX) :], node.id)
        return bound == node.id
    if isinstance(pattern, ast.AST):
        if type(pattern) is not type(node):
            return False
        return all(
            match(getattr(pattern, f, None), getattr(node, f, None), captures)
            for f in pattern._fields
            if f != "type_comment"
        )
    if isinstance(pattern, list):
        return (
            isinstance(node, list)
            and len(pattern) == len(node)
            and all(match(p, n, captures) for p, n in zip(pattern, node))
        )
    return pattern == node


def statement_lists(root: ast.AST) -> Iterator[list[ast.stmt]]:
    """Every list of statements under ``root`` (bodies, else-branches, handlers...)."""
    for node in ast.walk(root):
        for name in ("body", "orelse", "finalbody"):
            value = getattr(node, name, None)
            if isinstance(value, list) and value and isinstance(value[0], ast.stmt):
                yield value


def names_of(node: ast.AST, ctx: type) -> set[str]:
    """The names ``node`` holds in context ``ctx`` (``ast.Load`` read, ``ast.Store`` assigned)."""
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ctx)}


def clashes(
    writes: Mapping[str, set[str]], touched: Mapping[str, set[str]]
) -> Iterator[tuple[str, str, set[str]]]:
    """``(a, b, names)`` for each ordered pair of two different groups where group ``a``
    writes ``names`` that group ``b`` touches (``touched``: what each group reads, or reads
    and writes), in the groups' order; nothing where the groups are independent."""
    for a in writes:
        for b in touched:
            clash = writes[a] & touched[b] if a != b else set()
            if clash:
                yield a, b, clash
