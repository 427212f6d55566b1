"""``vllm-overlap prove CONFIG``: the static proof of every user site in a config, against the
installed vLLM, without loading a model.

Per site: ``applies`` (with the rewrite as a unified diff, and whether torch.compile gets a
custom op or upstream's statements) or ``refused`` with the rule and the statement; and the
architectures in vLLM's model registry whose model module defines the target class or imports
it by name (one level: a wrapper that reaches the class through another model module is not
listed).
"""

from __future__ import annotations

import ast

from vllm_overlap.cli.command import Command
from vllm_overlap.config.loader import ConfigError, load_config_file
from vllm_overlap.engine.rewrite import internal_error
from vllm_overlap.engine.user_sites import Proof, prove_all, read_module, rewritten_diff


def architectures_using(module: str, cls: str) -> list[str]:
    """Registered architectures whose model module is ``module`` or imports ``cls`` from it."""
    from vllm.model_executor.models.registry import ModelRegistry

    found, texts = [], {}
    for arch, entry in sorted(ModelRegistry.models.items()):
        model_module = getattr(entry, "module_name", None)
        if not model_module:
            continue
        if model_module == module:
            found.append(arch)
            continue
        if model_module not in texts:
            try:
                texts[model_module] = ast.parse(read_module(model_module))
            except (OSError, SyntaxError, ModuleNotFoundError):
                texts[model_module] = None
        tree = texts[model_module]
        if tree is not None and _imports(tree, module, cls):
            found.append(arch)
    return found


def _imports(tree: ast.Module, module: str, cls: str) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == module and any(a.name == cls for a in node.names):
                return True
    return False


def report(proof: Proof, text: str | None) -> str:
    cfg = proof.config
    lines = [f"site {cfg.id}: {cfg.module}.{cfg.function}"]
    if proof.site is None:
        lines.append(f"  refused: {proof.refused}")
        return "\n".join(lines)
    site = proof.site
    lines.append("  applies")
    lines.append(f"  entry parameters: {', '.join(site.params)}; tokens: {site.tokens}")
    lines.append(
        "  under torch.compile: "
        + (f"custom op torch.ops.vllm_overlap.{site.op}" if site.dynamo == "op" else proof.plain_reason)
    )
    cls = cfg.function.split(".")[0]
    try:
        archs = architectures_using(cfg.module, cls)
    except Exception as exc:  # the registry is vLLM's: report, do not fail the proof
        archs = [f"(model registry unreadable: {type(exc).__name__})"]
    lines.append(f"  models whose layers run it: {', '.join(archs) or 'none in the model registry'}")
    if text is not None:
        try:
            lines.append(rewritten_diff(proof, text).rstrip("\n"))
        except Exception as exc:  # ours: the verdict stands, the diff is not shown
            lines.append(f"  (no diff: {internal_error(exc)})")
    return "\n".join(lines)


def main(path: str) -> int:
    """0 if every site applies, 1 if one is refused, 2 for a bad config. Never raises for a
    site: a failure of ours while proving one is its refusal ``internal error: ...``."""
    try:
        config = load_config_file(path)
    except ConfigError as exc:
        print(exc)
        return 2
    if not config.sites:
        print(f"{path}: no sites to prove")
        return 0
    proofs = prove_all(config, path)
    for proof in proofs:
        try:
            text = read_module(proof.config.module)
        except Exception:  # unreadable now: the verdict without the diff
            text = None
        print(report(proof, text))
        print()
    refused = [p for p in proofs if p.site is None]
    print(f"{len(proofs) - len(refused)} of {len(proofs)} user sites apply")
    return 1 if refused else 0


def arguments(parser) -> None:
    parser.add_argument("config", help="a config file with a sites: section")


COMMAND = Command(
    "prove",
    "prove the config's user sites against the installed vLLM (no model loaded)",
    lambda args: main(args.config),
    arguments,
)
