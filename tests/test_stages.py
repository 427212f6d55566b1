"""The package's stages: each subpackage imports only lower stages (and the shared leaves), no
module imports another's private name, and the declarations' late references resolve.

Order, lowest first: engine, sites, config, runtime, testing, cli. ``vllm_overlap.log`` and
``vllm_overlap.outcomes`` are shared leaves every stage may import; they import nothing of ours.
Every import counts: at module level, inside functions and under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
import importlib
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "vllm_overlap")
STAGES = ("engine", "sites", "config", "runtime", "testing", "cli")
LEAVES = ("log", "outcomes")


def stage_of(module: str) -> str:
    """``vllm_overlap.<stage>...`` -> its stage; the leaves and the package itself by name."""
    parts = module.split(".")
    if parts[0] != "vllm_overlap":
        raise ValueError(module)
    return parts[1] if len(parts) > 1 else "vllm_overlap"


def imported_modules(path: str, module: str) -> list[tuple[int, str, list[str]]]:
    """(line, absolute module, imported names) of every import of ``vllm_overlap`` in a file."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, []) for a in node.names if a.name.startswith("vllm_overlap")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parent + ([node.module] if node.module else []))
            if base.startswith("vllm_overlap"):
                found.append((node.lineno, base, [a.name for a in node.names]))
    return found


def violations(module: str, imports) -> list[str]:
    """What ``module`` may not import, by the stage order (the rules of this file's doc)."""
    own = stage_of(module)
    out = []
    for line, target, names in imports:
        targets = [target]
        if target in ("vllm_overlap", *(f"vllm_overlap.{s}" for s in STAGES)):
            # `from vllm_overlap import x`: x is the module imported (a name of the package's
            # __init__, such as register or __version__, stays the package's)
            targets = [f"{target}.{n}" if f"{target}.{n}" != target else target for n in names] or [target]
        for each in targets:
            theirs = stage_of(each)
            if own in LEAVES and theirs != own:
                out.append(f"{module}:{line} leaf imports {each}")
            elif theirs in STAGES and own in STAGES and STAGES.index(theirs) > STAGES.index(own):
                out.append(f"{module}:{line} ({own}) imports {each} ({theirs}, a higher stage)")
            elif theirs in STAGES and own == "vllm_overlap" and each != "vllm_overlap.runtime.plugin":
                out.append(f"{module}:{line} the entry point imports {each} (only runtime.plugin)")
        for name in names:
            if name.startswith("_") and not name.startswith("__"):
                out.append(f"{module}:{line} imports the private name {name} from {target}")
    return out


def package_modules():
    for folder, _, files in os.walk(PACKAGE):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, ROOT)[: -len(".py")].replace(os.sep, ".")
                yield path, rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def test_every_module_belongs_to_a_stage_or_is_a_leaf():
    strays = [m for _, m in package_modules() if stage_of(m) not in (*STAGES, *LEAVES, "vllm_overlap")]
    assert strays == []
    for stage in STAGES:
        doc = ast.get_docstring(ast.parse(open(os.path.join(PACKAGE, stage, "__init__.py")).read()))
        assert doc and "May import" in doc, f"{stage}/__init__.py must say what the stage may import"


def test_no_stage_imports_a_higher_one_or_a_private_name():
    found = [v for path, module in package_modules() for v in violations(module, imported_modules(path, module))]
    assert found == []


@pytest.mark.parametrize(
    "module, imports, expected",
    [
        ("vllm_overlap.engine.rewrite", [(3, "vllm_overlap.runtime.hooks", ["wrap"])], "a higher stage"),
        ("vllm_overlap.sites.gdn_in_proj", [(4, "vllm_overlap.config", ["loader"])], "a higher stage"),
        ("vllm_overlap.runtime.plugin", [(5, "vllm_overlap.engine.rewrite", ["_match"])], "private name _match"),
        ("vllm_overlap.log", [(6, "vllm_overlap.engine.site", ["Site"])], "leaf imports"),
        ("vllm_overlap", [(7, "vllm_overlap.cli", ["main"])], "the entry point imports"),
    ],
)
def test_the_check_finds_each_kind_of_violation(module, imports, expected):
    assert any(expected in v for v in violations(module, imports))


def test_the_check_allows_lower_stages_and_leaves():
    assert violations("vllm_overlap.cli.doctor", [(1, "vllm_overlap.runtime", ["plugin"]), (2, "vllm_overlap", ["outcomes"])]) == []
    assert violations("vllm_overlap.runtime.census", [(1, "vllm_overlap.engine.rewrite", ["Target"])]) == []


def test_the_declarations_late_references_resolve():
    """A declaration names its runtime steps as ``module:function`` (the runtime is a higher
    stage): each one must name a function that exists."""
    from vllm_overlap.sites import FEATURES

    refs = []
    for feature in FEATURES.values():
        refs += [feature.post_load] if feature.post_load else []
        for site in feature.sites:
            refs += [site.upstream_switch] if site.upstream_switch else []
            refs += [entry.factory for _, entry in site.modes]
    assert refs, "the declarations name no runtime step: the check would prove nothing"
    for ref in refs:
        module, _, func = ref.partition(":")
        assert stage_of(module) == "runtime", ref
        assert callable(getattr(importlib.import_module(module), func)), ref
