"""How much the user-site proof accepts in the installed vLLM's models: every function (module
functions and class methods) of ``vllm/model_executor/models/*.py``, every adjacent pair of
statements in one block, declared as a user site of two single-statement groups (the first as
``current``, the second as ``aux``; ``tokens`` the first parameter either reads, else the first
name read), run through ``user_sites.prove``. Prints the pairs tried, those accepted, the
refusals by rule, every pair whose proof raised (a bug: the pair and the exception), and a
sample of the accepted pairs.

    python benchmarks/prove_survey.py [--sample N] [--json out.json]

Needs no GPU and imports no vLLM (the proof reads source only). To survey another checkout of
the overlay, put it first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import ast
import collections
import functools
import glob
import json
import os
import sys
import textwrap
import time


def _functions(tree: ast.Module):
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield f"{node.name}.{item.name}", item


def _blocks(func: ast.AST):
    for node in ast.walk(func):
        for name in ("body", "orelse", "finalbody"):
            value = getattr(node, name, None)
            if isinstance(value, list) and len(value) > 1 and isinstance(value[0], ast.stmt):
                yield value


def _tokens(func, stmts) -> str:
    params = [a.arg for a in [*func.args.posonlyargs, *func.args.args, *func.args.kwonlyargs]]
    read = [n.id for s in stmts for n in ast.walk(s) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)]
    for p in params:
        if p not in ("self", "cls") and p in read:
            return p
    return next((r for r in read if r not in ("self", "cls")), "x")


def pairs(models_dir: str):
    """(module, qualname, first statement text, second statement text, tokens) of every pair."""
    for path in sorted(glob.glob(os.path.join(models_dir, "*.py"))):
        module = "vllm.model_executor.models." + os.path.basename(path)[:-3]
        text = open(path, encoding="utf-8").read()
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        lines = text.splitlines(keepends=True)

        def segment(stmt: ast.stmt, lines=lines) -> str:  # the statement's whole lines (one each)
            return textwrap.dedent("".join(lines[stmt.lineno - 1 : stmt.end_lineno]))

        for qualname, func in _functions(tree):
            for body in _blocks(func):
                for a, b in zip(body, body[1:]):
                    if a.end_lineno >= b.lineno:
                        continue  # two statements on one line: not groups of their own
                    ta, tb = segment(a), segment(b)
                    if not ta.strip() or not tb.strip() or ta.strip() == tb.strip():
                        continue
                    yield module, qualname, ta, tb, _tokens(func, [a, b]), text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sample", type=int, default=25)
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    import importlib.util

    from vllm_overlap.engine import user_sites
    from vllm_overlap.engine.settings import UserSiteConfig

    # One parse per module text (the proof parses its module each time; same text, same tree).
    real_parse = ast.parse
    cached = functools.lru_cache(maxsize=64)(lambda source, *a: real_parse(source, *a))
    ast.parse = (
        lambda source, *a, **k: cached(source, *a)
        if not k and isinstance(source, str) and len(source) > 20000
        else real_parse(source, *a, **k)
    )

    models_dir = os.path.join(
        list(importlib.util.find_spec("vllm").submodule_search_locations)[0], "model_executor", "models"
    )
    tried, accepted, rules, crashes = 0, [], collections.Counter(), []
    start = time.perf_counter()
    for module, qualname, ta, tb, tokens, text in pairs(models_dir):
        tried += 1
        try:
            cfg = UserSiteConfig(id="survey", module=module, function=qualname, current=ta, aux=[tb], tokens=tokens)
        except Exception:
            rules["config"] += 1
            continue
        try:
            proof = user_sites.prove(cfg, text)
        except Exception as exc:  # a proof that crashes is a bug: count it apart, name the pair
            rules[f"crash {type(exc).__name__}"] += 1
            crashes.append(
                {
                    "module": module,
                    "function": qualname,
                    "current": ta.strip(),
                    "aux": tb.strip(),
                    "tokens": tokens,
                    "error": f"{type(exc).__name__}: {exc}",
                }
            )
            continue
        if proof.site is None:
            rules[proof.refused.split(":", 1)[0]] += 1
        else:
            accepted.append(
                {
                    "module": module,
                    "function": qualname,
                    "current": ta.strip(),
                    "aux": tb.strip(),
                    "tokens": tokens,
                    "dynamo": proof.site.dynamo,
                }
            )
    elapsed = time.perf_counter() - start
    print(f"models dir: {models_dir}")
    print(f"pairs tried: {tried}  accepted: {len(accepted)}  ({elapsed:.0f} s)")
    print("refused by rule: " + ", ".join(f"{r} {n}" for r, n in rules.most_common()))
    for item in crashes:
        print(
            f"CRASH {item['module'].rsplit('.', 1)[1]}.{item['function']}: "
            f"`{item['current']}` | `{item['aux']}` (tokens {item['tokens']}): {item['error']}"
        )
    step = max(1, len(accepted) // max(1, args.sample))
    for item in accepted[::step][: args.sample]:
        print(
            f"- {item['module'].rsplit('.', 1)[1]}.{item['function']} [{item['dynamo']}]: "
            f"`{item['current']}` | `{item['aux']}` (tokens {item['tokens']})"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"tried": tried, "accepted": accepted, "refused": dict(rules), "crashes": crashes}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
