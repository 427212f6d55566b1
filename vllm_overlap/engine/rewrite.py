"""Anchored rewrites: replace exact upstream statements inside a live function.

A rewrite names a target (module, ``Class.method`` or ``function``) and anchors: runs of
statements compared as normalised AST (formatting and comments do not matter; ``$name`` in an
anchor matches any identifier and binds it, so ``$qkvz, _ = self.in_proj_qkvz(hidden_states)``
matches whatever the variable is called). Every anchor must be found exactly ``count`` times.
The matched lines are replaced in the function's own source text, so everything else in the
function, including upstream fixes made after this anchor was written, flows through unchanged.

The rewritten function is compiled from its text in memory, never from a file: a second
rewrite stacked on the same target starts from the first one's in-memory text. The same text
is also written to a content-addressed file in a directory private to the user (0700, owned by
them, writable by nobody else, and so is every directory leading to it: ``cache_dir.py``), and
the compiled code names that file, so tracebacks show its
real lines and vLLM's compile cache (which hashes the source files of the code Dynamo traced)
keys on the rewritten code. An existing file is used only if its bytes are exactly the text.
Anything unexpected raises :class:`RewriteSkipped` with a reason and leaves the target
untouched.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
import re
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vllm_overlap.engine import cache_dir as _cache_dir
from vllm_overlap.engine.syntax import CAPTURE_RE, match, parse_anchor, statement_lists

MARKER = "__vllm_overlap_rewrite__"
# Decorators whose effect apply() carries over by re-wrapping; any other one refuses the target.
CARRIED_DECORATORS = ("staticmethod", "classmethod")


class RewriteSkipped(Exception):
    """The target was left untouched; ``str(exc)`` is the reason."""


class TargetAbsent(RewriteSkipped):
    """This vLLM does not define the target (a module, class or method of another release)."""


def internal_error(exc: BaseException, context: str = "") -> str:
    """The skip reason for a failure of ours (a bad declaration, an engine bug, a runtime that
    does not import): ``internal error: <type>: <message>``."""
    where = f" ({context})" if context else ""
    return f"internal error: {type(exc).__name__}: {exc}{where}"


@dataclass(frozen=True)
class Anchor:
    """Statements to find (``find``) and the statements that replace them (``replace``)."""

    find: str
    replace: str
    count: int = 1

    def first_line(self) -> str:
        return textwrap.dedent(self.find).strip().splitlines()[0]


@dataclass(frozen=True)
class Target:
    module: str
    qualname: str  # "Class.method" or "function"

    def __str__(self) -> str:
        return f"{self.module}.{self.qualname}"


# --------------------------------------------------------------------------- matching


@dataclass
class _Match:
    stmts: list[ast.stmt]
    captures: dict[str, str]


def find_anchor(func_node: ast.AST, anchor: Anchor) -> list[_Match]:
    pattern = parse_anchor(anchor.find)
    found: list[_Match] = []
    for stmts in statement_lists(func_node):
        i = 0
        while i + len(pattern) <= len(stmts):
            window = stmts[i : i + len(pattern)]
            captures: dict[str, str] = {}
            if match(pattern, window, captures):
                found.append(_Match(window, captures))
                i += len(pattern)
            else:
                i += 1
    return found


# --------------------------------------------------------------------------- source rewrite


def function_node(source: str) -> ast.FunctionDef | ast.AsyncFunctionDef:
    tree = ast.parse(source)
    if len(tree.body) != 1 or not isinstance(tree.body[0], (ast.FunctionDef, ast.AsyncFunctionDef)):
        raise RewriteSkipped("target source is not a single function definition")
    return tree.body[0]


def rewrite_source(source: str, anchors: list[Anchor] | tuple[Anchor, ...]) -> str:
    """Return ``source`` (one function definition) with every anchor replaced.

    Pure text in, text out: usable on sources that are never imported. Raises
    :class:`RewriteSkipped` when an anchor is missing, ambiguous, or not on lines of its own.
    """
    source = textwrap.dedent(source)
    func = function_node(source)
    foreign = [d for d in func.decorator_list if ast.unparse(d) not in CARRIED_DECORATORS]
    if foreign:
        names = ", ".join("@" + ast.unparse(d) for d in foreign)
        raise RewriteSkipped(f"decorated with {names}: the decorator cannot be carried over")
    lines = source.splitlines(keepends=True)
    edits: list[tuple[int, int, str]] = []  # (first line index, last line index, new text)
    for anchor in anchors:
        matches = find_anchor(func, anchor)
        if len(matches) != anchor.count:
            what = "not found" if not matches else f"found {len(matches)} times"
            raise RewriteSkipped(f"anchor `{anchor.first_line()}` {what}, expected {anchor.count}")
        for m in matches:
            first, last = m.stmts[0], m.stmts[-1]
            head = lines[first.lineno - 1]
            indent = head[: len(head) - len(head.lstrip())]
            tail = lines[last.end_lineno - 1][last.end_col_offset :].strip()
            if first.col_offset != len(indent) or (tail and not tail.startswith("#")):
                raise RewriteSkipped(f"anchor `{anchor.first_line()}` shares a line with other code")
            text = CAPTURE_RE.sub(
                lambda c, m=m, anchor=anchor: _capture(c.group(1), m.captures, anchor),
                textwrap.dedent(anchor.replace).strip("\n"),
            )
            new = "".join(indent + ln if ln.strip() else "\n" for ln in text.splitlines(True))
            edits.append((first.lineno - 1, last.end_lineno - 1, new.rstrip("\n") + "\n"))
    edits.sort()
    for (_, end_a, _), (start_b, _, _) in zip(edits, edits[1:]):
        if start_b <= end_a:
            raise RewriteSkipped("two anchors overlap")
    for start, end, new in reversed(edits):
        lines[start : end + 1] = [new]
    result = "".join(lines)
    function_node(result)  # must still parse as one function
    return result


def check_anchors(anchor_sets) -> None:
    """Every anchor of every set parses (``find`` and ``replace``); raises SyntaxError if one
    does not, whichever set a release would use: a broken declaration is never half used."""
    for anchors in anchor_sets:
        for anchor in anchors:
            parse_anchor(anchor.find)
            parse_anchor(anchor.replace)


def rewrite_first(source: str, anchor_sets) -> str:
    """``rewrite_source`` with the first anchor set that matches (the current release's
    statements first, then those of older releases); the first set's reason if none does.
    Raises SyntaxError, before matching anything, if any anchor of any set does not parse."""
    return first_match(source, anchor_sets)[1]


def first_match(source: str, anchor_sets) -> tuple[int, str]:
    """(index of the first anchor set that matches, the rewritten source): see rewrite_first."""
    anchor_sets = tuple(anchor_sets)
    check_anchors(anchor_sets)
    first_error: RewriteSkipped | None = None
    for index, anchors in enumerate(anchor_sets):
        try:
            return index, rewrite_source(source, anchors)
        except RewriteSkipped as exc:
            first_error = first_error or exc
    raise first_error if first_error else RewriteSkipped("no anchors")


def _capture(name: str, captures: dict[str, str], anchor: Anchor) -> str:
    if name not in captures:
        raise RewriteSkipped(f"replacement of `{anchor.first_line()}` uses unbound ${name}")
    return captures[name]


# --------------------------------------------------------------------------- live targets


# The private directory of the rewritten sources' files: cache_dir.py (these names kept).
cache_dir = _cache_dir.primary_dir
fallback_cache_dir = _cache_dir.fallback_dir
private_dir_problem = _cache_dir.private_dir_problem


def _write_source(name: str, text: str) -> str:
    """A content-addressed file holding exactly ``text``; return its path.

    The file is for tracebacks and vLLM's compile-cache hash only: nothing is ever compiled
    from it. An existing file whose bytes differ from ``text`` is replaced. Where and how it
    is written (a checked directory chain, relative to its descriptor): ``cache_dir.py``."""
    data = text.encode("utf-8")
    digest = hashlib.sha256(data).hexdigest()[:16]
    try:
        return _cache_dir.write_file(f"{name}.{digest}.py", data)
    except _cache_dir.Unsafe as exc:
        raise RewriteSkipped(f"no private cache directory for the rewritten source: {exc}") from None


def resolve_owner(target: Target) -> tuple[Any, str]:
    """(object that holds the function, attribute name); imports the module."""
    module = importlib.import_module(target.module)
    *path, attr = target.qualname.split(".")
    owner: Any = module
    for part in path:
        owner = getattr(owner, part, None)
        if owner is None:
            raise TargetAbsent(f"{target.module} has no {'.'.join(path)}")
    if attr not in vars(owner):
        raise TargetAbsent(f"{target.qualname} is not defined in {target.module}")
    return owner, attr


def _unwrap_descriptor(raw: Any) -> tuple[Any, Any]:
    if isinstance(raw, (staticmethod, classmethod)):
        return raw.__func__, type(raw)
    return raw, None


@dataclass
class InstalledRewrite:
    """One installed rewrite of a target (targets can carry rewrites of several features)."""

    feature: str
    previous: Any  # the raw attribute before this rewrite
    function: Any
    path: str
    source: str


@dataclass
class _TargetState:
    original: Any
    original_source: str
    original_file: str
    rewrites: list[InstalledRewrite] = field(default_factory=list)


_STATE: dict[Target, _TargetState] = {}


def current_source(target: Target) -> str:
    """Source of the target as installed now: the last rewrite's in-memory text, or
    upstream's source file."""
    owner, attr = resolve_owner(target)
    state = _STATE.get(target)
    if state:
        return state.rewrites[-1].source
    func, _ = _unwrap_descriptor(vars(owner)[attr])
    return textwrap.dedent(inspect.getsource(func))


def upstream_source(target: Target) -> str:
    resolve_owner(target)  # import first: a post-import hook may rewrite the target then
    state = _STATE.get(target)
    return state.original_source if state else current_source(target)


def original_function(target: Target) -> Any:
    """The target's upstream function (unwrapped), whether or not it is rewritten now."""
    owner, attr = resolve_owner(target)
    state = _STATE.get(target)
    return _unwrap_descriptor(state.original if state else vars(owner)[attr])[0]


def applied_features(target: Target) -> list[str]:
    return [layer.feature for layer in installed_rewrites(target)]


def installed_rewrites(target: Target) -> tuple[InstalledRewrite, ...]:
    """The rewrites installed on ``target``, first applied first (empty: upstream's code)."""
    state = _STATE.get(target)
    return tuple(state.rewrites) if state else ()


def rewritten_targets() -> list[Target]:
    """Every target that carries at least one rewrite now."""
    return [target for target, state in _STATE.items() if state.rewrites]


def apply(
    target: Target,
    anchors: list[Anchor] | tuple[Anchor, ...],
    feature: str,
    inject: dict[str, Any] | Callable[[str, int, Any], dict[str, Any]] | None = None,
    older: tuple = (),
) -> str:
    """Rewrite ``target`` in place; return the path of the rewritten source.

    ``older``: anchor sets tried in turn when ``anchors`` do not match (the same statements
    as older vLLM releases wrote them). ``inject``: the globals the rewritten code needs, or
    a function of (the source that was matched, the index of the anchor set that matched,
    the function being replaced) returning them, called before anything is installed.
    Applying the same feature twice is a no-op. Raises :class:`RewriteSkipped` (target
    untouched) on anything unexpected.
    """
    state = _STATE.get(target)
    if state:
        for layer in state.rewrites:
            if layer.feature == feature:
                return layer.path
    owner, attr = resolve_owner(target)
    raw = vars(owner)[attr]
    func, wrapper = _unwrap_descriptor(raw)
    if not inspect.isfunction(func):
        raise RewriteSkipped(f"{target.qualname} is a {type(func).__name__}, not a function")
    if getattr(func, MARKER, None) is not None and state is None:
        raise RewriteSkipped("rewritten by another copy of vllm-overlap")
    if state is not None:
        # Stack on the previous rewrite's text as this process made it, never on what a
        # file on disk says now; and only if nobody replaced that function since.
        if func is not state.rewrites[-1].function:
            raise RewriteSkipped(f"{target.qualname} was replaced after vllm-overlap rewrote it")
        source, upstream_file = state.rewrites[-1].source, state.original_file
    else:
        try:
            source = textwrap.dedent(inspect.getsource(func))
            upstream_file = inspect.getsourcefile(func) or "?"
        except (OSError, TypeError) as exc:
            raise RewriteSkipped(f"source not available ({exc})") from None
    index, new_source = first_match(source, (anchors, *older))  # refuses foreign decorators first
    if func.__code__.co_freevars:
        names = ", ".join(func.__code__.co_freevars)
        raise RewriteSkipped(f"closes over {names}: cannot be recompiled outside its scope")
    if "." in target.qualname and re.search(r"\b__[A-Za-z0-9_]*[A-Za-z0-9](?<!__)\b", source):
        raise RewriteSkipped("uses a private (name-mangled) attribute")

    module_globals = func.__globals__
    if callable(inject):
        inject = inject(source, index, func)
    for name, value in (inject or {}).items():
        if module_globals.get(name, value) is not value:
            raise RewriteSkipped(f"global name {name} already used in {func.__module__}")
    header = (
        f"# {target} rewritten by vllm-overlap feature {feature}.\n"
        f"# Upstream: {upstream_file}. Generated, content-addressed: safe to delete.\n"
    )
    text = header + new_source
    path = _write_source(f"{target}", text)
    namespace: dict[str, Any] = {}
    try:
        code = compile(text, path, "exec")
        for name, value in (inject or {}).items():
            module_globals[name] = value
        exec(code, module_globals, namespace)
    except Exception as exc:  # pragma: no cover - rewrite_source already parsed it
        raise RewriteSkipped(f"rewritten source does not compile: {exc}") from None
    new_func, _ = _unwrap_descriptor(namespace[func.__name__])
    new_func.__qualname__ = func.__qualname__
    new_func.__module__ = func.__module__
    new_func.__doc__ = func.__doc__
    new_func.__dict__.update({k: v for k, v in func.__dict__.items() if k != MARKER})
    setattr(new_func, MARKER, feature)
    if state is None:
        state = _STATE[target] = _TargetState(raw, source, upstream_file)
    state.rewrites.append(InstalledRewrite(feature, raw, new_func, path, new_source))
    setattr(owner, attr, wrapper(new_func) if wrapper else new_func)
    return path


def revert(target: Target, feature: str | None = None) -> bool:
    """Undo the rewrites of ``feature`` on ``target`` (all of them when None).

    Later rewrites stacked on top of ``feature`` are undone too. True if anything changed.
    """
    state = _STATE.get(target)
    if not state:
        return False
    names = [layer.feature for layer in state.rewrites]
    if feature is not None and feature not in names:
        return False
    keep = names.index(feature) if feature is not None else 0
    owner, attr = resolve_owner(target)
    setattr(owner, attr, state.rewrites[keep].previous)
    del state.rewrites[keep:]
    if not state.rewrites:
        del _STATE[target]
    return True
