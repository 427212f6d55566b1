"""User sites: overlap sites declared in the config's ``sites:``, proven before anything runs.

A user names a target function and writes its statement groups as upstream wrote them: one for
the current stream, one or more for aux streams. :func:`prove` reads the installed vLLM's
source of that function (and of its class, for what ``self.<name>`` is) without importing it,
and either refuses the site with the exact statement and the rule it breaks, or returns the
site as a declaration (``vllm_overlap.site.Site``), from which the overlay builds everything
else exactly as for a built-in site.

The rules (each refusal names one):

- ``match``: each group matches exactly once in the function, all in one block;
- ``statement``: a group holds only assignments to plain names (no control flow, no
  expression statements, no ``del``), and the groups are not inside a loop;
- ``assignment``: no attribute or item assignment, no augmented assignment (``x += y`` is in
  place on a tensor);
- ``in-place``: no in-place method (``x.add_(y)``, ``x.copy_(y)``: a name ending in ``_``);
- ``collective``: no collective (``all_reduce``, ``all_gather``... by name), no
  ``RowParallelLinear`` (it all-reduces), no layer built with ``gather_output``;
- ``call``: every call is a submodule of ``self`` that ``__init__`` builds as a vLLM linear
  layer other than ``RowParallelLinear`` (which all-reduces) or a norm, or a function or
  method on the short allowlist of pure tensor operations below; anything else is a call the
  proof cannot see into;
- ``independent``: no group writes a name another group reads or writes;
- ``between``: a statement between the groups that one of them is moved ahead of commutes with
  it (neither writes a name the other reads or writes) and obeys the rules above itself;
- ``result``: every group produces a name the function uses after the groups;
- ``name``: every name a group reads is bound in the function or a module global;
- ``tokens``: the token-count parameter is one the groups read;
- ``no_lora``: each module named there is one ``__init__`` builds.

What the proof cannot see (what a call does at run time, aliasing through views) is checked the
first time the site runs in each process (``runtime.hazards``).

No torch and no vLLM import here: ``register()`` runs this in every vLLM process.
"""

from __future__ import annotations

import ast
import builtins
import difflib
import importlib.util
import os
import textwrap
from dataclasses import dataclass, field

from .rewrite import Anchor, RewriteSkipped, Target, _parse_anchor, find_anchor
from .settings import FeatureConfig, UserSiteConfig
from .site import Branch, Facts, Feature, Form, Output, Site
from .sources import find_function

# Pure tensor functions a group may call (by the name it uses), and tensor methods.
PURE_FUNCTIONS = frozenset(
    {
        "torch.cat", "torch.stack", "torch.split", "torch.chunk", "torch.narrow", "torch.reshape",
        "torch.flatten", "torch.transpose", "torch.permute", "torch.unsqueeze", "torch.squeeze",
        "torch.sigmoid", "torch.tanh", "torch.exp", "torch.matmul", "torch.bmm",
        "F.linear", "F.silu", "F.gelu", "F.relu", "F.softplus", "F.rms_norm", "F.layer_norm",
        "torch.nn.functional.linear", "rearrange", "len", "int", "tuple",
    }
)
PURE_METHODS = frozenset(
    {
        "view", "reshape", "split", "chunk", "narrow", "flatten", "unflatten", "transpose",
        "permute", "unsqueeze", "squeeze", "contiguous", "float", "half", "bfloat16", "to", "t",
        "sigmoid", "tanh", "exp", "size", "dim", "clone", "unbind", "softmax", "sum", "mean",
        "matmul", "view_as", "reshape_as", "type_as",
    }
)
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast", "barrier")
NORMS = frozenset({"RMSNorm", "LayerNorm", "GemmaRMSNorm", "nn.LayerNorm", "torch.nn.LayerNorm"})
ENTRY = "run"
REGISTERED_NAME = "_vllm_overlap_layer_name"


@dataclass
class Proof:
    """What :func:`prove` found for one user site."""

    config: UserSiteConfig
    site: Site | None = None
    refused: str = ""  # the rule and the statement, when refused
    plain_reason: str = ""  # why it is not a custom op under torch.compile ("" if it is)
    notes: list[str] = field(default_factory=list)

    @property
    def target(self) -> Target:
        return Target(self.config.module, self.config.function)


class Refused(Exception):
    """A rule the declaration breaks: ``rule: statement: reason``."""

    def __init__(self, rule: str, reason: str, node: ast.AST | None = None):
        where = f"`{ast.unparse(node)}`: " if node is not None else ""
        super().__init__(f"{rule}: {where}{reason}")


# ---------------------------------------------------------------------------------------------
# Reading the installed source without importing it
# ---------------------------------------------------------------------------------------------


def module_path(module: str) -> str:
    """The file of ``module`` in its top-level package's directory (nothing imported)."""
    top, *rest = module.split(".")
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"no package {top}")
    base = os.path.join(list(spec.submodule_search_locations)[0], *rest)
    for path in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"no module {module}")


def read_module(module: str) -> str:
    with open(module_path(module), encoding="utf-8") as fh:
        return fh.read()


# ---------------------------------------------------------------------------------------------
# The proof
# ---------------------------------------------------------------------------------------------


def _names(node: ast.AST, ctx: type) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ctx)}


def _reads(stmts: list[ast.stmt]) -> list[str]:
    """Names read before the statements assign them, in order of first appearance."""
    seen: list[str] = []
    defined: set[str] = set()
    for stmt in stmts:
        loads = [n.id for n in ast.walk(stmt) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)]
        for name in loads:
            if name not in defined and name not in seen:
                seen.append(name)
        defined |= _names(stmt, ast.Store)
    return seen


def _writes(stmts: list[ast.stmt]) -> set[str]:
    return set().union(*(_names(s, ast.Store) for s in stmts)) if stmts else set()


def _module_globals(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            names |= _names(node, ast.Store)
        elif isinstance(node, (ast.If, ast.Try)):  # guarded imports
            names |= {(a.asname or a.name).split(".")[0] for n in ast.walk(node)
                      if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
            names |= _names(node, ast.Store)
    return names


def submodules(tree: ast.Module, qualname: str) -> dict[str, str]:
    """``self.<name> = <Constructor>(...)`` in the target class's ``__init__`` (and in the
    ``__init__`` of the bases defined in the same module): name -> constructor's name."""
    parts = qualname.split(".")
    if len(parts) < 2:
        return {}
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    out: dict[str, str] = {}
    todo = [parts[-2]]
    while todo:
        cls = classes.get(todo.pop(0))
        if cls is None:
            continue
        init = next((n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
        for node in ast.walk(init) if init else ():
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                value = node.value
                if not isinstance(value, ast.Call):
                    continue
                gathers = any(
                    k.arg == "gather_output" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                    for k in value.keywords
                )
                for t in targets:
                    if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                        # a column-parallel layer built with gather_output all-gathers its output
                        out.setdefault(t.attr, ast.unparse(value.func) + ("(gather_output)" if gathers else ""))
        todo += [ast.unparse(b) for b in cls.bases]
    return out


def _check_call(call: ast.Call, modules: dict[str, str]) -> None:
    func = call.func
    text = ast.unparse(func)
    last = text.rsplit(".", 1)[-1]
    if any(c in last for c in COLLECTIVES):
        raise Refused("collective", f"{last} is a collective: it must stay on the main stream", call)
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "self":
        ctor = modules.get(func.attr)
        if ctor is None:
            raise Refused("call", f"self.{func.attr} is not built in __init__: the proof cannot see what it is", call)
        name = ctor.rsplit(".", 1)[-1]
        if "RowParallel" in name:
            raise Refused("collective", f"self.{func.attr} is a {name}, which all-reduces its output", call)
        if name.endswith("(gather_output)"):
            raise Refused("collective", f"self.{func.attr} is built with gather_output, which all-gathers its output", call)
        if not (name.endswith("Linear") or ctor in NORMS or name in NORMS):
            raise Refused("call", f"self.{func.attr} is a {ctor}: the proof cannot see into it", call)
        return
    if isinstance(func, ast.Attribute) and last.endswith("_") and not last.endswith("__"):
        raise Refused("in-place", f"{last} writes its tensor in place", call)
    if text in PURE_FUNCTIONS:
        return
    if isinstance(func, ast.Attribute) and last in PURE_METHODS and not text.startswith(("self.", "torch.")):
        return
    raise Refused("call", f"{text} is not a submodule of self nor on the pure-operation allowlist", call)


def _check_statement(stmt: ast.stmt, modules: dict[str, str]) -> None:
    if isinstance(stmt, ast.AugAssign):
        raise Refused("assignment", "an augmented assignment works in place on a tensor", stmt)
    if not isinstance(stmt, ast.Assign):
        raise Refused("statement", f"a {type(stmt).__name__} statement: a group holds only assignments", stmt)
    for target in stmt.targets:
        for node in ast.walk(target):
            if isinstance(node, (ast.Attribute, ast.Subscript)):
                raise Refused("assignment", "attribute or item assignment changes shared state", stmt)
    for node in ast.walk(stmt.value):
        if isinstance(node, ast.Call):
            _check_call(node, modules)
        elif isinstance(node, (ast.Lambda, ast.NamedExpr, ast.Await, ast.Yield, ast.YieldFrom)):
            raise Refused("statement", f"a {type(node).__name__} inside a group", stmt)


def _body_lists(func: ast.AST):
    for node in ast.walk(func):
        for name in ("body", "orelse", "finalbody"):
            value = getattr(node, name, None)
            if isinstance(value, list) and value and isinstance(value[0], ast.stmt):
                yield value


def _group(func, text: str, which: str):
    try:
        _parse_anchor(text)
    except SyntaxError as exc:
        raise Refused("match", f"the {which} group is not Python: {exc.msg} (line {exc.lineno})") from None
    matches = find_anchor(func, Anchor(text, ""))
    if len(matches) != 1:
        raise Refused("match", f"the {which} group matches {len(matches)} times in the function, expected 1")
    stmts = matches[0].stmts
    for body in _body_lists(func):
        if any(s is stmts[0] for s in body):
            start = next(i for i, s in enumerate(body) if s is stmts[0])
            return body, list(range(start, start + len(stmts)))
    raise Refused("match", f"the {which} group is not a run of statements of one block")  # pragma: no cover


def _in_loop(func: ast.AST, body: list[ast.stmt]) -> bool:
    """Whether ``body`` is (inside) the body of a for or while loop of ``func``."""
    for node in ast.walk(func):
        if isinstance(node, (ast.For, ast.AsyncFor, ast.While)):
            for inner in ast.walk(node):
                for name in ("body", "orelse", "finalbody"):
                    if getattr(inner, name, None) is body:
                        return True
    return False


def _used_after(func: ast.AST, body: list[ast.stmt], end: int) -> set[str]:
    """Names loaded anywhere in the function after ``body[end]`` (the rest of the block and of
    every enclosing block: a conservative superset of what the groups must return)."""
    last_line = body[end].end_lineno
    return {
        n.id for n in ast.walk(func)
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and n.lineno > last_line
    }


def _linear_output(stmt: ast.Assign, name: str, modules: dict[str, str]) -> str | None:
    """``self.<P>`` when ``stmt`` assigns ``name`` a vLLM linear layer's output
    (``name, _ = self.P(x)`` or ``name = self.P(x)[0]``), else None."""
    target, value = stmt.targets[0], stmt.value
    call = None
    if isinstance(target, ast.Tuple) and len(target.elts) == 2 and isinstance(target.elts[0], ast.Name):
        if target.elts[0].id == name and isinstance(value, ast.Call):
            call = value
    elif isinstance(target, ast.Name) and target.id == name and isinstance(value, ast.Subscript):
        index = value.slice
        if isinstance(value.value, ast.Call) and isinstance(index, ast.Constant) and index.value == 0:
            call = value.value
    if call is None:
        return None
    func = call.func
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "self":
        ctor = modules.get(func.attr, "")
        if ctor.rsplit(".", 1)[-1].endswith("Linear"):
            return f"self.{func.attr}"
    return None


def prove(cfg: UserSiteConfig, text: str, source: str = "config") -> Proof:
    """The static proof of one user site against ``text``, its module's installed source."""
    proof = Proof(cfg)
    try:
        _prove(proof, text, source)
    except Refused as exc:
        proof.refused = str(exc)
        proof.site = None
    return proof


def _prove(proof: Proof, text: str, source: str) -> None:
    cfg = proof.config
    tree = ast.parse(text)
    func = find_function(tree, cfg.function)
    if func is None:
        raise Refused("match", f"{cfg.function} is not defined in {cfg.module}")
    # Work on the function's own text, as the rewrite engine does (it matches the same lines).
    lines = text.splitlines(keepends=True)
    start = (func.decorator_list[0].lineno if func.decorator_list else func.lineno) - 1
    func_text = textwrap.dedent("".join(lines[start : func.end_lineno]))
    func = ast.parse(func_text).body[0]
    func_lines = func_text.splitlines(keepends=True)
    modules = submodules(tree, cfg.function)
    known = _module_globals(tree) | set(vars(builtins))

    groups = [("current", cfg.current)] + [
        ("aux" if i == 0 else f"aux{i + 1}", t) for i, t in enumerate(cfg.aux)
    ]
    found = {}
    body = None
    for which, gtext in groups:
        gbody, idx = _group(func, gtext, which)
        if body is None:
            body = gbody
        elif gbody is not body:
            raise Refused("match", f"the {which} group is not in the same block as the current group")
        if set(idx) & {i for v in found.values() for i in v}:
            raise Refused("match", f"the {which} group overlaps another group")
        found[which] = idx
    if _in_loop(func, body):
        raise Refused("statement", "the groups sit in a loop: a later iteration could read what they write")
    for which, idx in found.items():
        for i in idx:
            _check_statement(body[i], modules)
    lo = min(i for v in found.values() for i in v)
    hi = max(i for v in found.values() for i in v)
    grouped = {i for v in found.values() for i in v}
    others = [i for i in range(lo, hi + 1) if i not in grouped]

    reads = {w: _reads([body[i] for i in idx]) for w, idx in found.items()}
    # "_" is the throwaway every `x, _ = self.proj(h)` writes: not a result unless read
    reads_underscore = any("_" in r for r in reads.values()) or "_" in _used_after(func, body, hi)
    writes = {w: _writes([body[i] for i in idx]) - ({"_"} if not reads_underscore else set()) for w, idx in found.items()}
    for a in found:
        for b in found:
            if a == b:
                continue
            clash = writes[a] & (set(reads[b]) | writes[b])
            if clash:
                raise Refused(
                    "independent",
                    f"the {a} group writes {', '.join(sorted(clash))}, which the {b} group "
                    f"{'reads' if clash & set(reads[b]) else 'writes'}",
                )
    for i in others:  # each is moved after every group that had a statement after it
        stmt = body[i]
        ahead = [w for w, idx in found.items() if max(idx) > i]
        if not ahead:
            continue
        try:
            _check_statement(stmt, modules)
        except Refused as exc:
            raise Refused("between", f"{exc} (it sits between the groups and would move after them)") from None
        o_reads, o_writes = set(_reads([stmt])), _writes([stmt])
        for w in ahead:
            clash = (o_writes & (set(reads[w]) | writes[w])) | (writes[w] & o_reads)
            if clash:
                raise Refused(
                    "between",
                    f"it sits between the groups and does not commute with the {w} group "
                    f"(both touch {', '.join(sorted(clash))})",
                    stmt,
                )

    # What each group returns: the names it writes that anything after the groups reads (the
    # statements between them included: they run after the call).
    after = _used_after(func, body, hi)
    for i in others:
        after |= set(_reads([body[i]]))
    returns = {}
    for w in found:
        ordered = [n for n in _ordered_writes([body[i] for i in found[w]]) if n in after]
        if not ordered:
            raise Refused("result", f"the {w} group produces nothing the function uses after it")
        returns[w] = ordered

    # A name the groups read is a parameter of the entry where the function binds it (an
    # argument or any assignment in it: a local shadows a module global), else a global.
    args = func.args
    local = {a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]}
    local |= {a.arg for a in (args.vararg, args.kwarg) if a is not None} | _names(func, ast.Store)
    params = ["self"]
    for w in found:
        for name in reads[w]:
            if name in local:
                if name not in params:
                    params.append(name)
            elif name not in known:
                raise Refused("name", f"the {w} group reads {name}, which is neither bound in the function nor a module global")
    if not any("self" in reads[w] for w in reads):
        raise Refused("call", "the groups call nothing on self: no layer to overlap")
    if cfg.tokens not in params[1:]:
        raise Refused("tokens", f"tokens {cfg.tokens!r} is not a name the groups read ({', '.join(params[1:])})")
    for name in cfg.no_lora:
        attr = name.removeprefix("self.")
        if attr not in modules:
            raise Refused("no_lora", f"{name} is not built in {cfg.function.split('.')[0]}.__init__")

    # The rewrite: one call at the first group's place, then the other statements in order.
    region = textwrap.dedent("".join(func_lines[body[lo].lineno - 1 : body[hi].end_lineno]))
    targets = ", ".join(
        names[0] if len(names) == 1 else f"({', '.join(names)})" for names in returns.values()
    )
    replacement = f"{targets} = __site__.{ENTRY}({', '.join(params)})\n" + "".join(
        textwrap.dedent("".join(func_lines[body[i].lineno - 1 : body[i].end_lineno])) for i in others
    )
    anchor = Anchor(find=region, replace=replacement)
    if len(find_anchor(func, anchor)) != 1:
        raise Refused("match", "the statements from the first group to the last match more than once")

    outputs, plain_reason = [], ""
    for w, names in returns.items():
        for name in names:
            stmt = next(body[i] for i in reversed(found[w]) if name in _names(body[i], ast.Store))
            width = _linear_output(stmt, name, modules)
            if width is None:
                plain_reason = (
                    f"{name} is not a vLLM linear layer's output, so no op can promise its shape: "
                    "under torch.compile the site runs upstream's statements"
                )
                break
            outputs.append(Output(name, like=cfg.tokens, width=width))
        if plain_reason:
            break
    proof.plain_reason = plain_reason
    branch = {w: Branch(t, ", ".join(returns[w])) for w, t in groups}
    aux = tuple(branch[w] for w, _ in groups[1:])
    op = not plain_reason
    why = cfg.why or f"declared by the user in {source}"
    proof.site = Site(
        id=cfg.feature_name,
        feature=cfg.feature_name,
        summary=f"user site {cfg.id}: {len(groups)} groups of {cfg.function}",
        targets=(Target(cfg.module, cfg.function),),
        forms=(Form((anchor,), current=branch["current"], aux=aux),),
        entry=ENTRY,
        params=tuple(params),
        tokens=cfg.tokens,
        dynamo="op" if op else "plain",
        outputs=tuple(outputs) if op else (),
        registry=op,
        layer_name_expr=f"self.{REGISTERED_NAME}",
        facts=Facts(
            why=why,
            how=(
                f"the current group on the current stream beside {len(groups) - 1} aux group(s), "
                "proven independent by the overlay's static rules and checked at its first run "
                "in each process"
            ),
            upstream="a user site: not in vLLM",
            remove_when=f"the user removes sites[{cfg.id}] from {source}",
        ),
        checked_at_first_run=True,
        no_lora=tuple(n if n.startswith("self.") else f"self.{n}" for n in cfg.no_lora),
    )


def _ordered_writes(stmts: list[ast.stmt]) -> list[str]:
    out: list[str] = []
    for stmt in stmts:
        for target in getattr(stmt, "targets", []):
            for node in ast.walk(target):
                if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store) and node.id not in out:
                    out.append(node.id)
    return [n for n in out if n != "_"]


# ---------------------------------------------------------------------------------------------
# The user features of a config
# ---------------------------------------------------------------------------------------------


def feature_of(proof: Proof) -> Feature:
    """The feature a proven user site runs as (its config key is the site entry itself)."""
    assert proof.site is not None
    return Feature(
        name=proof.config.feature_name,
        summary=proof.site.summary,
        sites=(proof.site,),
        settings=FeatureConfig,
    )


def prove_all(config, source: str = "config", read=read_module) -> list[Proof]:
    """The proof of every site in ``config`` (an OverlayConfig) against the installed source."""
    proofs = []
    for cfg in config.sites:
        try:
            text = read(cfg.module)
        except (OSError, ModuleNotFoundError) as exc:
            proofs.append(Proof(cfg, refused=f"match: cannot read {cfg.module}: {exc}"))
            continue
        proofs.append(prove(cfg, text, source))
    return proofs


def rewritten_diff(proof: Proof, text: str) -> str:
    """Unified diff of the module text with the site applied (``vllm-overlap prove``)."""
    from .sources import rewrite_module_text

    if proof.site is None:
        return ""
    feature = feature_of(proof)
    new, _ = rewrite_module_text(text, list(feature.rewrites))
    rel = proof.config.module.replace(".", "/") + ".py"
    return "".join(
        difflib.unified_diff(text.splitlines(keepends=True), new.splitlines(keepends=True), f"a/{rel}", f"b/{rel}")
    )


def refusal_error(proof: Proof) -> RewriteSkipped:
    return RewriteSkipped(f"user site {proof.config.id}: refused: {proof.refused}")
