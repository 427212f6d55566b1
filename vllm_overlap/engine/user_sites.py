"""User sites: overlap sites declared in the config's ``sites:``, proven before anything runs.

A user names a target function and writes its statement groups as upstream wrote them: one for
the current stream, one or more for aux streams. :func:`prove` reads the installed vLLM's
source of that function, of its class and bases (for what ``self.<name>`` is), and of the
modules their names come from, without importing any of it, and either refuses the site with
the exact statement and the rule it breaks, or returns the site as a declaration
(``vllm_overlap.engine.site.Site``), from which the overlay builds everything else exactly as for a
built-in site.

The proof is by construction: every statement the rewrite moves (the groups, and the
statements between them that move after a group) is checked by every rule, and anything the
proof cannot see into is refused. Names are resolved to what they are before a rule trusts
them: a call's name through the module's imports and aliases (``F`` is
``torch.nn.functional``, an imported class is the class its module defines); ``self.<name>``
through every assignment to it in every method of the class and of its bases (any branch of
``__init__``, helpers such as ``self.create_qkvz_proj(...)`` followed into their ``return``),
each constructor's arguments bound to the constructor's real signature (read from vLLM's
source). The rules (each refusal names one):

- ``match``: each group matches exactly once in the function, all in one block;
- ``per-step``: the function runs per forward step: a ``forward`` method of the class
  (``forward``, ``forward_cuda``, ...) or a method they reach (through ``self.<method>(...)``,
  or a custom op of the module they call whose function calls it);
- ``statement``: a group holds only assignments to plain names (no control flow, no
  expression statements, no ``del``), and the groups are not inside a loop;
- ``assignment``: no attribute or item assignment, no augmented assignment (``x += y`` is in
  place on a tensor);
- ``in-place``: no in-place form in a group: a method ending in ``_``, ``inplace=True`` (or
  the positional flag), ``out=``, a norm given a residual (vLLM's RMSNorm then writes both
  arguments in place); between the groups, each of those counts as a write of its arguments;
- ``collective``: no collective (``all_reduce``, ``all_gather``... by name), no layer that
  resolves to ``RowParallelLinear`` (it all-reduces), no column-parallel layer whose
  ``gather_output`` (bound by keyword or position) is not the constant ``False``;
- ``call``: every call is one of: a submodule of ``self`` that every assignment builds as a
  vLLM linear layer with no collective (``ColumnParallelLinear``, ``MergedColumnParallelLinear``,
  ``QKVParallelLinear``, ``ReplicatedLinear`` of ``vllm.model_executor.layers.linear``) or a
  norm (vLLM's ``RMSNorm``, ``GemmaRMSNorm``, ``LayerNorm``; torch's ``LayerNorm``); a function
  that resolves to one on the short allowlist of pure tensor functions; an allowlisted tensor
  method on a local. Reading a property of ``self``, subscripting ``self.<name>`` and unpacking
  it run code the proof cannot see, and are refused too;
- ``gemm``: each group calls at least one vLLM linear layer;
- ``independent``: no group writes a name another group reads or writes;
- ``between``: a statement between the groups that one of them is moved ahead of commutes with
  it (neither rebinds a name the other reads or writes, and what it writes in place shares no
  name, or name derived from it, with the group) and obeys the rules above itself;
- ``result``: every group produces a name the function uses after the groups;
- ``name``: every name a group or a moved statement reads is bound in the function or a
  module global;
- ``tokens``: the token-count parameter is one the groups read, and a tensor (annotated
  ``torch.Tensor``, or the input of a linear layer or norm in a group);
- ``no_lora``: each module named there is one the class builds;
- ``runtime``: what the runtime checks before it installs the rewrite holds too (the engine's
  rewrite applies, the function closes over nothing, no private name, the branches compile):
  a site ``prove`` accepts is one the runtime applies.

What the proof cannot see (what a call does at run time, aliasing through views and between
the arguments) is checked the first time the site runs in each process, and again for every
new combination of argument aliasing and shape class (``runtime.hazards``): the groups, and
the statements the rewrite moves after them.

No torch and no vLLM import here: ``register()`` runs this in every vLLM process.
"""

from __future__ import annotations

import ast
import builtins
import difflib
import importlib.util
import os
import re
import textwrap
from dataclasses import dataclass, field

from vllm_overlap.engine.rewrite import Anchor, RewriteSkipped, Target, find_anchor, internal_error
from vllm_overlap.engine.settings import FeatureConfig, UserSiteConfig
from vllm_overlap.engine.site import Branch, Facts, Feature, Form, Output, Site
from vllm_overlap.engine.sources import find_function
from vllm_overlap.engine.syntax import clashes, names_of, parse_anchor, statement_lists

LINEAR_MODULE = "vllm.model_executor.layers.linear"
# vLLM linear layers with no collective (a column-parallel one only without gather_output).
LINEAR = frozenset(
    f"{LINEAR_MODULE}.{n}"
    for n in ("ColumnParallelLinear", "MergedColumnParallelLinear", "QKVParallelLinear", "ReplicatedLinear")
)
ROW_PARALLEL = f"{LINEAR_MODULE}.RowParallelLinear"
# Norms: a second argument (a residual) makes vLLM's write both arguments in place.
NORMS = frozenset(
    {
        "vllm.model_executor.layers.layernorm.RMSNorm",
        "vllm.model_executor.layers.layernorm.GemmaRMSNorm",
        "vllm.model_executor.layers.layernorm.LayerNorm",
        "torch.nn.LayerNorm",
        "torch.nn.modules.normalization.LayerNorm",
    }
)
# Pure tensor functions a group may call, by what their name resolves to: the index of a
# positional ``inplace`` flag, or None.
PURE_FUNCTIONS = {
    **{
        f"torch.{n}": None
        for n in (
            "cat",
            "stack",
            "split",
            "chunk",
            "narrow",
            "reshape",
            "flatten",
            "transpose",
            "permute",
            "unsqueeze",
            "squeeze",
            "sigmoid",
            "tanh",
            "exp",
            "matmul",
            "bmm",
        )
    },
    **{f"torch.nn.functional.{n}": None for n in ("linear", "gelu", "softplus", "rms_norm", "layer_norm")},
    "torch.nn.functional.silu": 1,
    "torch.nn.functional.relu": 1,
    "einops.rearrange": None,
    "builtins.len": None,
    "builtins.int": None,
    "builtins.tuple": None,
}
PURE_METHODS = frozenset(
    {
        "view",
        "reshape",
        "split",
        "chunk",
        "narrow",
        "flatten",
        "unflatten",
        "transpose",
        "permute",
        "unsqueeze",
        "squeeze",
        "contiguous",
        "float",
        "half",
        "bfloat16",
        "to",
        "t",
        "sigmoid",
        "tanh",
        "exp",
        "size",
        "dim",
        "clone",
        "unbind",
        "softmax",
        "sum",
        "mean",
        "matmul",
        "view_as",
        "reshape_as",
        "type_as",
    }
)
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast", "barrier")
# The methods vLLM calls each forward step (CustomOp dispatches to one of the forward_*).
FORWARD_NAMES = frozenset(
    {
        "forward",
        "forward_native",
        "forward_cuda",
        "forward_hip",
        "forward_xpu",
        "forward_cpu",
        "forward_tpu",
        "forward_oot",
        "__call__",
    }
)
# Bases whose source is not read: torch's modules and Python's own (they build no vLLM layer).
OPAQUE_BASES = ("torch.", "typing.", "abc.", "builtins.", "collections.", "enum.")
TENSOR = frozenset({"torch.Tensor", "torch.tensor"})
ENTRY = "run"
REGISTERED_NAME = "_vllm_overlap_layer_name"
_MANGLED = re.compile(r"\b__[A-Za-z0-9_]*[A-Za-z0-9](?<!__)\b")  # as the rewrite engine


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


@dataclass
class ModuleInfo:
    """One module's source, parsed once: what each top-level name is."""

    name: str
    text: str
    tree: ast.Module
    imports: dict[str, set[str]]  # local name -> the dotted names it is imported as
    classes: dict[str, ast.ClassDef]
    functions: dict[str, ast.FunctionDef]
    assigned: set[str]  # names a top-level assignment binds
    custom_ops: dict[str, str] | None = None  # (cached by _custom_op_functions)

    @property
    def globals(self) -> set[str]:
        return set(self.imports) | set(self.classes) | set(self.functions) | self.assigned


_INFOS: dict[str, ModuleInfo] = {}


def module_info(module: str, text: str | None = None) -> ModuleInfo:
    """The parsed module (``text``: its source, else the installed file's), cached by text."""
    cached = _INFOS.get(module)
    if cached is not None and (text is None or cached.text == text):
        return cached
    text = read_module(module) if text is None else text
    tree = ast.parse(text)
    package = module if module_path_is_package(module) else module.rpartition(".")[0]
    imports: dict[str, set[str]] = {}
    assigned: set[str] = set()
    for node in _top_level(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                local = a.asname or a.name.split(".")[0]
                imports.setdefault(local, set()).add(a.name if a.asname else local)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            for a in node.names:
                imports.setdefault(a.asname or a.name, set()).add(f"{base}.{a.name}")
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            assigned |= names_of(node, ast.Store)
    info = ModuleInfo(
        module,
        text,
        tree,
        imports,
        {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)},
        {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))},
        assigned,
    )
    _INFOS[module] = info
    return info


def module_path_is_package(module: str) -> bool:
    try:
        return module_path(module).endswith("__init__.py")
    except (FileNotFoundError, ModuleNotFoundError, ValueError):
        return False


def _top_level(tree: ast.Module):
    """The module's statements, into ``if`` and ``try`` (guarded imports), not into defs."""
    todo = list(tree.body)
    while todo:
        node = todo.pop(0)
        yield node
        if isinstance(node, (ast.If, ast.Try)):
            for name in ("body", "orelse", "finalbody"):
                todo += getattr(node, name, [])
            for handler in getattr(node, "handlers", []):
                todo += handler.body


# ---------------------------------------------------------------------------------------------
# Names resolved to what they are
# ---------------------------------------------------------------------------------------------


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value)
        return f"{head}.{node.attr}" if head else None
    return None


def resolve(info: ModuleInfo, node: ast.AST, local: set[str] = frozenset()) -> str | None:
    """The dotted name ``node`` (a name or attribute chain) stands for at module level, through
    the module's imports (None: bound locally, ambiguous, or not a module-level name)."""
    text = _dotted(node)
    if text is None:
        return None
    head, _, rest = text.partition(".")
    if head in local:
        return None
    sources = set(info.imports.get(head, ()))
    if head in info.classes or head in info.functions:
        sources.add(f"{info.name}.{head}")
    if head in info.assigned:
        return None  # rebound at module level: not what an import says
    if not sources and hasattr(builtins, head):
        sources.add(f"builtins.{head}")
    if len(sources) != 1:
        return None
    base = sources.pop()
    return canonical(f"{base}.{rest}" if rest else base)


def canonical(dotted: str, depth: int = 0) -> str:
    """A vLLM name followed through re-exports to the module that defines it."""
    if depth > 8 or not dotted.startswith("vllm."):
        return dotted
    module, _, name = dotted.rpartition(".")
    try:
        info = module_info(module)
    except (OSError, SyntaxError, ModuleNotFoundError, ValueError):
        return dotted
    if name in info.classes or name in info.functions or name in info.assigned:
        return dotted
    sources = info.imports.get(name, set())
    return canonical(next(iter(sources)), depth + 1) if len(sources) == 1 else dotted


def _class_of(dotted: str) -> tuple[ModuleInfo, ast.ClassDef] | None:
    module, _, name = dotted.rpartition(".")
    try:
        info = module_info(module)
    except (OSError, SyntaxError, ModuleNotFoundError, ValueError):
        return None
    cls = info.classes.get(name)
    return (info, cls) if cls is not None else None


# ---------------------------------------------------------------------------------------------
# The class: its hierarchy, what each self.<name> is built as, which methods run per step
# ---------------------------------------------------------------------------------------------


@dataclass
class ClassView:
    """The target class and every base whose source the proof reads."""

    name: str
    classes: list[tuple[ModuleInfo, ast.ClassDef]]
    unread: list[str]  # bases the proof cannot read (not torch's or Python's own)

    def methods(self) -> dict[str, tuple[ModuleInfo, ast.FunctionDef]]:
        """Each method name -> its definition nearest the class (the one an instance runs)."""
        out: dict[str, tuple[ModuleInfo, ast.FunctionDef]] = {}
        for info, cls in self.classes:
            for node in cls.body:
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    out.setdefault(node.name, (info, node))
        return out


def class_view(info: ModuleInfo, name: str) -> ClassView | None:
    cls = info.classes.get(name)
    if cls is None:
        return None
    view = ClassView(name, [], [])
    todo = [(info, cls)]
    while todo:
        here, node = todo.pop(0)
        if any(node is c for _, c in view.classes):
            continue
        view.classes.append((here, node))
        for base in node.bases:
            expr = base.value if isinstance(base, ast.Subscript) else base
            dotted = resolve(here, expr)
            if dotted is not None and (dotted.startswith(OPAQUE_BASES) or dotted == "builtins.object"):
                continue
            found = _class_of(dotted) if dotted else None
            if found is None:
                view.unread.append(dotted or ast.unparse(base))
            else:
                todo.append(found)
    return view


def _assigned_values(view: ClassView, attr: str) -> list[tuple[ModuleInfo, ast.AST | None]]:
    """Every value any method of the class or its bases assigns to ``self.<attr>`` (None where
    it is not a plain assignment: unpacked, setattr, a class attribute...)."""
    out: list[tuple[ModuleInfo, ast.AST | None]] = []
    for info, cls in view.classes:
        for item in cls.body:
            if (
                isinstance(item, (ast.Assign, ast.AnnAssign))
                and attr in names_of(item, ast.Store)
                and getattr(item, "value", None) is not None
            ):
                out.append((info, None))  # a class attribute: not built by a constructor
        for node in ast.walk(cls):
            if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    if _is_self_attr(t, attr):
                        out.append((info, node.value if not isinstance(node, ast.AugAssign) else None))
                    elif isinstance(t, (ast.Tuple, ast.List)) and any(_is_self_attr(e, attr) for e in ast.walk(t)):
                        out.append((info, None))
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr":
                if len(node.args) >= 2 and not (isinstance(node.args[1], ast.Constant) and node.args[1].value != attr):
                    out.append((info, None))
    return out


def _is_self_attr(node: ast.AST, attr: str) -> bool:
    return (
        isinstance(node, ast.Attribute)
        and node.attr == attr
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
    )


def constructors(view: ClassView, attr: str, depth: int = 0) -> list[tuple[ModuleInfo, ast.Call | None]]:
    """Each constructor call ``self.<attr>`` may be built by: every assigned value, both arms of
    a conditional expression, and the ``return`` values of a helper method of the class
    (``self.create_qkvz_proj(...)``); None for a value the proof cannot see into."""
    out = []
    for info, value in _assigned_values(view, attr):
        out += _values(view, info, value, depth)
    return out


def _values(view: ClassView, info: ModuleInfo, value, depth: int) -> list:
    if isinstance(value, ast.IfExp):
        return _values(view, info, value.body, depth) + _values(view, info, value.orelse, depth)
    if not isinstance(value, ast.Call):
        return [(info, None)]
    func = value.func
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "self":
        helper = view.methods().get(func.attr)
        if helper is None or depth > 3:
            return [(info, None)]
        here, node = helper
        returns = [r.value for r in ast.walk(node) if isinstance(r, ast.Return)]
        if not returns or any(r is None for r in returns):
            return [(here, None)]
        return [v for r in returns for v in _values(view, here, r, depth + 1)]
    return [(info, value)]


@dataclass(frozen=True)
class Built:
    """What a constructor call builds, as far as the rules care."""

    kind: str  # "linear", "norm", "row", "gather", "other"
    what: str  # the constructor's text or resolved name
    returns_tuple: bool | None = True  # a linear layer's (output, bias), None: unknown


def built(info: ModuleInfo, call: ast.Call | None) -> Built:
    if call is None:
        return Built("other", "value the proof cannot see into")
    text = ast.unparse(call.func)
    dotted = resolve(info, call.func)
    if dotted == ROW_PARALLEL:
        return Built("row", "RowParallelLinear")
    if dotted in NORMS:
        return Built("norm", dotted.rsplit(".", 1)[1])
    if dotted not in LINEAR:
        return Built("other", text)
    bound = bind_constructor(dotted, call)
    if bound is None:
        return Built(
            "gather", f"{dotted.rsplit('.', 1)[1]} built with arguments the proof cannot bind (*args, **kwargs)"
        )
    gather = bound.get("gather_output")
    if gather is not None and not (isinstance(gather, ast.Constant) and gather.value is False):
        return Built("gather", f"{dotted.rsplit('.', 1)[1]} built with gather_output={ast.unparse(gather)}")
    ret = bound.get("return_bias")
    returns_tuple = (
        True if ret is None else (ret.value if isinstance(ret, ast.Constant) and isinstance(ret.value, bool) else None)
    )
    return Built("linear", dotted.rsplit(".", 1)[1], returns_tuple)


def bind_constructor(dotted: str, call: ast.Call) -> dict[str, ast.AST] | None:
    """The call's arguments by the parameter names of the class's real ``__init__`` (read from
    vLLM's source); None where the proof cannot bind them (``*args``, ``**kwargs``)."""
    found = _class_of(dotted)
    init = None
    if found is not None:
        init = next((n for n in found[1].body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
    if init is None or any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None for k in call.keywords):
        return None
    names = [a.arg for a in [*init.args.posonlyargs, *init.args.args]][1:]
    if len(call.args) > len(names):
        return None
    bound = dict(zip(names, call.args))
    bound.update({k.arg: k.value for k in call.keywords})
    return bound


def submodule(view: ClassView, attr: str, call: ast.Call) -> Built:
    """What ``self.<attr>`` is, from every constructor that may build it; Refused where one
    is a collective or something the proof cannot see into."""
    if view.unread:
        raise Refused(
            "call", f"{view.name} derives from {', '.join(view.unread)}, whose source the proof cannot read", call
        )
    if attr in view.methods():
        raise Refused("call", f"self.{attr} is a method: the proof does not look into it", call)
    ctors = constructors(view, attr)
    if not ctors:
        raise Refused("call", f"self.{attr} is not built in __init__: the proof cannot see what it is", call)
    kinds = [built(info, c) for info, c in ctors]
    for b in kinds:
        if b.kind == "row":
            raise Refused("collective", f"self.{attr} is a RowParallelLinear, which all-reduces its output", call)
        if b.kind == "gather":
            raise Refused("collective", f"self.{attr} is a {b.what}: it may all-gather its output", call)
    other = [b for b in kinds if b.kind == "other"]
    if other:
        raise Refused("call", f"self.{attr} is a {other[0].what}: the proof cannot see into it", call)
    if len({b.kind for b in kinds}) > 1:
        raise Refused(
            "call",
            f"self.{attr} is built as {' or '.join(sorted({b.what for b in kinds}))}: not one kind of layer",
            call,
        )
    tuples = {b.returns_tuple for b in kinds}
    return Built(kinds[0].kind, kinds[0].what, tuples.pop() if len(tuples) == 1 else None)


def is_property(view: ClassView, attr: str) -> bool:
    method = view.methods().get(attr)
    return method is not None and bool(method[1].decorator_list)


_PER_STEP: dict[tuple[int, str, str], bool] = {}


def per_step(view: ClassView, info: ModuleInfo, method: str) -> bool:
    """Whether ``method`` runs each forward step: a forward method of the class, or one they
    reach through calls of the class's methods or of the module's custom ops' functions."""
    key = (id(info.tree), view.name, method)
    if key not in _PER_STEP:
        _PER_STEP[key] = _reaches(view, info, method)
    return _PER_STEP[key]


def _reaches(view: ClassView, info: ModuleInfo, method: str) -> bool:
    methods = view.methods()
    ops = _custom_op_functions(info)
    todo = [methods[m][1] for m in methods if m in FORWARD_NAMES]
    seen: set[int] = set()
    while todo:
        fn = todo.pop()
        if id(fn) in seen:
            continue
        seen.add(id(fn))
        if fn.name == method and any(fn is m for _, m in methods.values()):
            return True
        for node in ast.walk(fn):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            if isinstance(node.func, ast.Attribute) and name in methods:
                todo.append(methods[name][1])
            text = ast.unparse(node.func)
            if text.startswith("torch.ops.") and name in ops:
                todo.append(info.functions[ops[name]])
            elif isinstance(node.func, ast.Name) and name in info.functions:
                todo.append(info.functions[name])
    return False


def _custom_op_functions(info: ModuleInfo) -> dict[str, str]:
    """op name -> the module function registered as that op (``direct_register_custom_op``)."""
    if info.custom_ops is not None:
        return info.custom_ops
    out = info.custom_ops = {}
    for node in ast.walk(info.tree):
        if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("register_custom_op"):
            kw = {k.arg: k.value for k in node.keywords}
            name = kw.get("op_name", node.args[0] if node.args else None)
            func = kw.get("op_func", node.args[1] if len(node.args) > 1 else None)
            if isinstance(name, ast.Constant) and isinstance(func, ast.Name) and func.id in info.functions:
                out[name.value] = func.id
    return out


# ---------------------------------------------------------------------------------------------
# One statement: the rules it obeys, and what it reads and writes
# ---------------------------------------------------------------------------------------------


def _reads(stmts: list[ast.stmt]) -> list[str]:
    """Names read before the statements assign them, in order of first appearance."""
    seen: list[str] = []
    defined: set[str] = set()
    for stmt in stmts:
        loads = [n.id for n in ast.walk(stmt) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)]
        for name in loads:
            if name not in defined and name not in seen:
                seen.append(name)
        defined |= names_of(stmt, ast.Store)
    return seen


def _writes(stmts: list[ast.stmt]) -> set[str]:
    return set().union(*(names_of(s, ast.Store) for s in stmts)) if stmts else set()


def _root(node: ast.AST) -> str | None:
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call, ast.Starred)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


@dataclass
class Effects:
    """What one statement does, as the rules see it."""

    inplace: set[str] = field(default_factory=set)  # names whose tensors it writes in place
    gemms: list[str] = field(default_factory=list)  # self.<linear layer>s it calls
    inputs: set[str] = field(default_factory=set)  # names passed to a linear layer or norm


@dataclass
class Scope:
    """What a statement's names are: the module, the class, the function's own names."""

    info: ModuleInfo
    view: ClassView
    local: set[str]
    in_group: bool = True


def check_statement(stmt: ast.stmt, scope: Scope) -> Effects:
    """The statement obeys the statement, assignment, in-place, collective and call rules;
    returns what it does (in a group, any in-place form is refused)."""
    if isinstance(stmt, ast.AugAssign):
        raise Refused("assignment", "an augmented assignment works in place on a tensor", stmt)
    if not isinstance(stmt, ast.Assign):
        raise Refused("statement", f"a {type(stmt).__name__} statement: a group holds only assignments", stmt)
    for target in stmt.targets:
        for node in ast.walk(target):
            if isinstance(node, (ast.Attribute, ast.Subscript)):
                raise Refused("assignment", "attribute or item assignment changes shared state", stmt)
        if isinstance(target, (ast.Tuple, ast.List)) and _opaque_value(stmt.value, scope):
            raise Refused(
                "call", f"unpacking {ast.unparse(stmt.value)} runs its __iter__: the proof cannot see into it", stmt
            )
    effects = Effects()
    callees = {id(n.func) for n in ast.walk(stmt.value) if isinstance(n, ast.Call)}
    for node in ast.walk(stmt.value):
        if isinstance(node, ast.Call):
            _check_call(node, scope, effects)
        elif isinstance(node, (ast.Lambda, ast.NamedExpr, ast.Await, ast.Yield, ast.YieldFrom)):
            raise Refused("statement", f"a {type(node).__name__} inside a group", stmt)
        elif isinstance(node, ast.Subscript) and _opaque_value(node.value, scope):
            raise Refused(
                "call",
                f"subscripting {ast.unparse(node.value)} runs its __getitem__: the proof cannot see into it",
                node,
            )
        elif isinstance(node, ast.Attribute) and id(node) not in callees and _is_self_attr(node, node.attr):
            if is_property(scope.view, node.attr):
                raise Refused(
                    "call", f"self.{node.attr} is a property: reading it runs code the proof cannot see", node
                )
    return effects


def _opaque_value(node: ast.AST, scope: Scope) -> bool:
    """An object whose ``__getitem__``/``__iter__`` the proof cannot see: an attribute of
    self (a module, a list of modules), or a module-level object."""
    if isinstance(node, ast.Attribute):
        return _root(node) == "self" or _root(node) not in scope.local
    return isinstance(node, ast.Name) and (node.id == "self" or node.id not in scope.local)


def _check_call(call: ast.Call, scope: Scope, effects: Effects) -> None:
    func = call.func
    text = ast.unparse(func)
    last = text.rsplit(".", 1)[-1]
    if any(c in last for c in COLLECTIVES):
        raise Refused("collective", f"{last} is a collective: it must stay on the main stream", call)
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "self":
        _check_module_call(call, func.attr, scope, effects)
        return
    written = _out_and_inplace(call, resolve(scope.info, func, scope.local))
    if isinstance(func, ast.Attribute) and last.endswith("_") and not last.endswith("__"):
        written.append((func.value, f"{last} writes its tensor in place"))
    for target, why in written:
        _write_in_place(target, why, call, scope, effects)
    dotted = resolve(scope.info, func, scope.local)
    if dotted in PURE_FUNCTIONS:
        return
    is_method = isinstance(func, ast.Attribute) and dotted is None and _root(func.value) in scope.local
    if is_method and _root(func.value) != "self" and (last in PURE_METHODS or last.endswith("_")):
        return
    raise Refused("call", f"{text} is not a submodule of self nor on the pure-operation allowlist", call)


def _out_and_inplace(call: ast.Call, dotted: str | None) -> list[tuple[ast.AST, str]]:
    """The arguments a call writes: ``out=``, ``inplace=`` (keyword or positional flag)."""
    name = ast.unparse(call.func).rsplit(".", 1)[-1]
    out = []
    for k in call.keywords:
        if k.arg == "out":
            out.append((k.value, f"{name} with out= writes {ast.unparse(k.value)}"))
        elif k.arg == "inplace" and not (isinstance(k.value, ast.Constant) and k.value.value is False):
            out += [(a, f"{name} with inplace={ast.unparse(k.value)} writes its input in place") for a in call.args[:1]]
    flag = PURE_FUNCTIONS.get(dotted) if dotted else None
    if flag is not None and len(call.args) > flag:
        value = call.args[flag]
        if not (isinstance(value, ast.Constant) and value.value is False):
            out += [(call.args[0], f"{name} with the inplace flag {ast.unparse(value)} writes its input in place")]
    return out


def _write_in_place(target: ast.AST, why: str, call: ast.Call, scope: Scope, effects: Effects) -> None:
    if scope.in_group:
        raise Refused("in-place", why, call)
    root = _root(target)
    if root is None or root == "self" or root not in scope.local:
        raise Refused("in-place", f"{why}, which is not a local tensor", call)
    effects.inplace.add(root)


def _check_module_call(call: ast.Call, attr: str, scope: Scope, effects: Effects) -> None:
    what = submodule(scope.view, attr, call)
    first = call.args[0] if call.args else None
    if isinstance(first, ast.Name):
        effects.inputs.add(first.id)
    if what.kind == "linear":
        effects.gemms.append(f"self.{attr}")
        return
    # a norm: its input alone is pure; anything more (a residual) is written in place
    extra = call.args[1:] + [
        k.value for k in call.keywords if not (isinstance(k.value, ast.Constant) and k.value.value is None)
    ]
    if extra or any(isinstance(a, ast.Starred) for a in call.args):
        for arg in call.args + [k.value for k in call.keywords]:
            _write_in_place(
                arg,
                f"self.{attr} is a {what.what} given a residual: it writes its arguments in place",
                call,
                scope,
                effects,
            )


# ---------------------------------------------------------------------------------------------
# The proof, one function per rule
# ---------------------------------------------------------------------------------------------


def _group(func, text: str, which: str):
    try:
        parse_anchor(text)
    except SyntaxError as exc:
        raise Refused("match", f"the {which} group is not Python: {exc.msg} (line {exc.lineno})") from None
    matches = find_anchor(func, Anchor(text, ""))
    if len(matches) != 1:
        raise Refused("match", f"the {which} group matches {len(matches)} times in the function, expected 1")
    stmts = matches[0].stmts
    for body in statement_lists(func):
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
        n.id for n in ast.walk(func) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and n.lineno > last_line
    }


@dataclass
class _Work:
    """What the rules share: the function, its groups, and what each does."""

    cfg: UserSiteConfig
    info: ModuleInfo
    view: ClassView | None
    func: ast.FunctionDef
    func_text: str
    groups: list[tuple[str, str]]  # (which, text) in the declaration's order
    body: list[ast.stmt] = field(default_factory=list)
    found: dict[str, list[int]] = field(default_factory=dict)  # which -> statement indexes
    effects: dict[int, Effects] = field(default_factory=dict)  # statement index -> effects
    reads: dict[str, list[str]] = field(default_factory=dict)
    writes: dict[str, set[str]] = field(default_factory=dict)
    moved: list[int] = field(default_factory=list)  # statements the rewrite moves after a group
    returns: dict[str, list[str]] = field(default_factory=dict)
    params: list[str] = field(default_factory=list)

    @property
    def lo(self) -> int:
        return min(i for v in self.found.values() for i in v)

    @property
    def hi(self) -> int:
        return max(i for v in self.found.values() for i in v)

    @property
    def local(self) -> set[str]:
        args = self.func.args
        names = {a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]}
        names |= {a.arg for a in (args.vararg, args.kwarg) if a is not None}
        return names | names_of(self.func, ast.Store)

    def scope(self, in_group: bool) -> Scope:
        return Scope(self.info, self.view, self.local, in_group)


def prove(cfg: UserSiteConfig, text: str, source: str = "config") -> Proof:
    """The static proof of one user site against ``text``, its module's installed source.
    Never raises: a failure of ours while proving is the site's refusal
    ``internal error: <type>: <message>``, and the site does not apply."""
    proof = Proof(cfg)
    try:
        _prove(proof, text, source)
    except Refused as exc:
        proof.refused = str(exc)
        proof.site = None
    except Exception as exc:  # ours: an engine bug, never an exception into vLLM or the CLI
        proof.refused = internal_error(exc)
        proof.site = None
        proof.plain_reason = ""
    return proof


def _prove(proof: Proof, text: str, source: str) -> None:
    work = _target(proof.config, text)
    _rule_match(work)
    _rule_groups(work)
    _rule_independent(work)
    _rule_between(work)
    _rule_result(work)
    _rule_names(work)
    _rule_tokens_and_no_lora(work)
    anchor = _rewrite_anchor(work)
    proof.plain_reason = _op_reason(work)
    proof.site = _site(work, anchor, source, op=not proof.plain_reason)
    _rule_runtime(work, proof)


def _target(cfg: UserSiteConfig, text: str) -> _Work:
    """The function (as the rewrite engine sees it: its own text), its class; per-step rule."""
    info = module_info(cfg.module, text)
    func = find_function(info.tree, cfg.function)
    if func is None:
        raise Refused("match", f"{cfg.function} is not defined in {cfg.module}")
    lines = text.splitlines(keepends=True)
    start = (func.decorator_list[0].lineno if func.decorator_list else func.lineno) - 1
    func_text = textwrap.dedent("".join(lines[start : func.end_lineno]))
    parts = cfg.function.split(".")
    view = class_view(info, parts[-2]) if len(parts) >= 2 else None
    if view is None or not per_step(view, info, parts[-1]):
        raise Refused(
            "per-step",
            f"{cfg.function} does not run per forward step: it is not a forward method of its class, "
            "nor one a forward method reaches",
        )
    groups = [("current", cfg.current)] + [("aux" if i == 0 else f"aux{i + 1}", t) for i, t in enumerate(cfg.aux)]
    return _Work(cfg, info, view, _function_alone(func_text, func), func_text, groups)


def _function_alone(func_text: str, func: ast.AST) -> ast.FunctionDef:
    """The function parsed from its own text, as the runtime parses it (``inspect.getsource``,
    dedented). Refused where that text does not parse: a line less indented than the ``def``
    (a string literal continued at column 0, as llava_next's docstring) keeps the def indented,
    and the runtime's rewrite cannot compile the function (it would skip the site)."""
    try:
        return ast.parse(func_text).body[0]
    except SyntaxError as exc:
        def_line = func_text.splitlines()[
            func.lineno - (func.decorator_list[0].lineno if func.decorator_list else func.lineno)
        ]
        indent = len(def_line) - len(def_line.lstrip())
        short = next(
            (i for i, ln in enumerate(func_text.splitlines(), 1) if ln.strip() and len(ln) - len(ln.lstrip()) < indent),
            None,
        )
        where = (
            f"line {short} of it is less indented than its def (a string literal continued at column 0), "
            if short is not None
            else ""
        )
        raise Refused(
            "runtime",
            f"the runtime would skip it: {where}so the function's own text does not parse "
            f"({type(exc).__name__}: {exc.msg}) and cannot be rewritten",
        ) from None


def _rule_match(work: _Work) -> None:
    """Each group once, all in one block, not in a loop; the statements between them."""
    for which, gtext in work.groups:
        gbody, idx = _group(work.func, gtext, which)
        if not work.body:
            work.body = gbody
        elif gbody is not work.body:
            raise Refused("match", f"the {which} group is not in the same block as the current group")
        if set(idx) & {i for v in work.found.values() for i in v}:
            raise Refused("match", f"the {which} group overlaps another group")
        work.found[which] = idx
    if _in_loop(work.func, work.body):
        raise Refused("statement", "the groups sit in a loop: a later iteration could read what they write")
    grouped = {i for v in work.found.values() for i in v}
    work.moved = [i for i in range(work.lo, work.hi + 1) if i not in grouped]


def _rule_groups(work: _Work) -> None:
    """Every group statement obeys the statement rules; each group calls a GEMM."""
    scope = work.scope(in_group=True)
    for which, idx in work.found.items():
        for i in idx:
            work.effects[i] = check_statement(work.body[i], scope)
        if not any(work.effects[i].gemms for i in idx):
            raise Refused("gemm", f"the {which} group calls no vLLM linear layer: nothing to overlap")


def _rule_independent(work: _Work) -> None:
    body, found = work.body, work.found
    work.reads = {w: _reads([body[i] for i in idx]) for w, idx in found.items()}
    # "_" is the throwaway every `x, _ = self.proj(h)` writes: not a result unless read
    reads_underscore = any("_" in r for r in work.reads.values()) or "_" in _used_after(work.func, body, work.hi)
    drop = set() if reads_underscore else {"_"}
    work.writes = {w: _writes([body[i] for i in idx]) - drop for w, idx in found.items()}
    touched = {w: set(work.reads[w]) | work.writes[w] for w in found}
    for a, b, clash in clashes(work.writes, touched):
        raise Refused(
            "independent",
            f"the {a} group writes {', '.join(sorted(clash))}, which the {b} group "
            f"{'reads' if clash & set(work.reads[b]) else 'writes'}",
        )


def _aliases(work: _Work) -> dict[str, set[str]]:
    """Name -> every name whose tensor may share its memory within the function: any
    assignment links its targets with every name its value reads (a view, a split...), but
    for a vLLM linear layer's output, which is new memory."""
    func = work.func
    parent: dict[str, str] = {}

    def find(n: str) -> str:
        while parent.get(n, n) != n:
            n = parent[n]
        return n

    for node in ast.walk(func):
        if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)) and node.value is not None:
            if _fresh(work, node.value):
                continue
            names = (names_of(node, ast.Store) | names_of(node.value, ast.Load)) - {"self", "_"}
            names = sorted(names)
            for n in names[1:]:
                parent[find(n)] = find(names[0])
    classes: dict[str, set[str]] = {}
    for n in list(parent):
        classes.setdefault(find(n), set()).add(n)
    return {n: classes[find(n)] for n in parent}


def _fresh(work: _Work, value: ast.AST) -> bool:
    """``self.P(x)`` or ``self.P(x)[0]`` where P is a vLLM linear layer (new memory)."""
    if isinstance(value, ast.Subscript):
        value = value.value
    if not (isinstance(value, ast.Call) and _is_self_call(value)):
        return False
    try:
        return submodule(work.view, value.func.attr, value).kind == "linear"
    except Refused:
        return False


def _rule_between(work: _Work) -> None:
    """Each statement the rewrite moves after a group obeys every rule and commutes with it."""
    scope = work.scope(in_group=False)
    aliases = _aliases(work)
    for i in work.moved:
        stmt = work.body[i]
        try:
            effects = work.effects[i] = check_statement(stmt, scope)
        except Refused as exc:
            raise Refused("between", f"{exc} (it sits between the groups and would move after them)") from None
        o_reads, o_writes = set(_reads([stmt])), _writes([stmt])
        in_place = set().union(*(aliases.get(n, {n}) for n in effects.inplace)) if effects.inplace else set()
        for w, idx in work.found.items():
            if max(idx) < i:
                continue
            touched = set(work.reads[w]) | work.writes[w]
            clash = (o_writes & touched) | (work.writes[w] & o_reads)
            if clash:
                raise Refused(
                    "between",
                    f"it sits between the groups and does not commute with the {w} group "
                    f"(both touch {', '.join(sorted(clash))})",
                    stmt,
                )
            clash = {n for n in touched - {"self"} if aliases.get(n, {n}) & in_place}
            if clash:
                raise Refused(
                    "between",
                    f"it writes {', '.join(sorted(effects.inplace))} in place, and the {w} group it "
                    f"would move after reads {', '.join(sorted(clash))}, which may be the same memory",
                    stmt,
                )


def _rule_result(work: _Work) -> None:
    """What each group returns: the names it writes that anything after it reads (the moved
    statements included: they run after the call)."""
    after = _used_after(work.func, work.body, work.hi)
    for i in work.moved:
        after |= set(_reads([work.body[i]]))
    for w in work.found:
        ordered = [n for n in _ordered_writes([work.body[i] for i in work.found[w]]) if n in after]
        if not ordered:
            raise Refused("result", f"the {w} group produces nothing the function uses after it")
        work.returns[w] = ordered


def _rule_names(work: _Work) -> None:
    """A name the groups read is a parameter of the entry where the function binds it (an
    argument or any assignment in it: a local shadows a module global), else a global. So is
    a name a moved statement reads from before the groups (the dynamic check reruns them)."""
    local, known = work.local, work.info.globals | set(vars(builtins))
    work.params = ["self"]
    for w in work.found:
        for name in work.reads[w]:
            if name in local:
                if name not in work.params:
                    work.params.append(name)
            elif name not in known:
                raise Refused(
                    "name", f"the {w} group reads {name}, which is neither bound in the function nor a module global"
                )
    bound = set().union(*work.writes.values())
    for i in work.moved:
        for name in _reads([work.body[i]]):
            if name in local and name not in bound and name not in work.params:
                work.params.append(name)
            elif name not in local and name not in known:
                raise Refused(
                    "name",
                    f"a moved statement reads {name}, which is neither bound in the function nor a module global",
                    work.body[i],
                )
        bound |= _writes([work.body[i]])


def _tensors(work: _Work) -> set[str]:
    """Entry parameters known to be tensors: annotated ``torch.Tensor`` in the signature and
    never rebound before the groups, or passed to a linear layer or norm in a group."""
    out = set()
    args = work.func.args
    rebound = _writes(work.body[: work.lo]) if work.body else set()
    for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]:
        if a.annotation is not None and resolve(work.info, a.annotation) in TENSOR and a.arg not in rebound:
            out.add(a.arg)
    for idx in work.found.values():
        defined: set[str] = set()
        for i in idx:
            out |= work.effects[i].inputs - defined
            defined |= _writes([work.body[i]])
    return out


def _rule_tokens_and_no_lora(work: _Work) -> None:
    cfg = work.cfg
    if cfg.tokens not in work.params[1:]:
        raise Refused("tokens", f"tokens {cfg.tokens!r} is not a name the groups read ({', '.join(work.params[1:])})")
    if cfg.tokens not in _tensors(work):
        raise Refused(
            "tokens",
            f"tokens {cfg.tokens!r} is not known to be a tensor (annotated torch.Tensor, or the input "
            "of a linear layer or norm in a group): its first dimension cannot count tokens",
        )
    for name in cfg.no_lora:
        attr = name.removeprefix("self.")
        if not constructors(work.view, attr):
            raise Refused("no_lora", f"{name} is not built in {cfg.function.split('.')[0]}.__init__")


def _rewrite_anchor(work: _Work) -> Anchor:
    """One call at the first group's place, then the moved statements in order."""
    lines = work.func_text.splitlines(keepends=True)
    body = work.body

    def text_of(i: int) -> str:
        return textwrap.dedent("".join(lines[body[i].lineno - 1 : body[i].end_lineno]))

    region = textwrap.dedent("".join(lines[body[work.lo].lineno - 1 : body[work.hi].end_lineno]))
    targets = ", ".join(n[0] if len(n) == 1 else f"({', '.join(n)})" for n in work.returns.values())
    replacement = f"{targets} = __site__.{ENTRY}({', '.join(work.params)})\n" + "".join(text_of(i) for i in work.moved)
    anchor = Anchor(find=region, replace=replacement)
    try:
        found = find_anchor(work.func, anchor)
    except SyntaxError as exc:  # a line of the region less indented than its first
        raise Refused(
            "runtime",
            "the runtime would skip it: the statements from the first group to the last do not parse "
            f"on their own (a string literal continued at column 0?): {type(exc).__name__}: {exc.msg}",
        ) from None
    if len(found) != 1:
        raise Refused("match", "the statements from the first group to the last match more than once")
    return anchor


def _linear_output(stmt: ast.Assign, name: str, work: _Work) -> tuple[str, str] | None:
    """(``self.<P>``, its input's name) when ``stmt`` assigns ``name`` a vLLM linear layer's
    output (``name, _ = self.P(x)``, ``name = self.P(x)[0]``, or ``name = self.P(x)`` where
    every constructor of P passes ``return_bias=False``), else None."""
    target, value = stmt.targets[0], stmt.value
    call, wants_tuple = None, True
    if isinstance(target, ast.Tuple) and len(target.elts) == 2 and isinstance(target.elts[0], ast.Name):
        if target.elts[0].id == name and isinstance(value, ast.Call):
            call = value
    elif isinstance(target, ast.Name) and target.id == name and isinstance(value, ast.Subscript):
        index = value.slice
        if isinstance(value.value, ast.Call) and isinstance(index, ast.Constant) and index.value == 0:
            call = value.value
    elif isinstance(target, ast.Name) and target.id == name and isinstance(value, ast.Call):
        call, wants_tuple = value, False
    if call is None or not _is_self_call(call) or len(call.args) != 1 or call.keywords:
        return None
    what = submodule(work.view, call.func.attr, call)
    if what.kind != "linear" or what.returns_tuple is not wants_tuple or not isinstance(call.args[0], ast.Name):
        return None
    return f"self.{call.func.attr}", call.args[0].id


def _is_self_call(call: ast.Call) -> bool:
    func = call.func
    return isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "self"


def _like(work: _Work, idx: list[int], upto: int, name: str) -> str | None:
    """The entry parameter whose leading dimensions ``name`` has just before ``body[upto]``:
    followed back through the group's linear layers and norms (which keep them)."""
    for i in reversed([j for j in idx if j < upto]):
        stmt = work.body[i]
        if name not in names_of(stmt, ast.Store):
            continue
        linear = _linear_output(stmt, name, work)
        if linear is not None:
            return _like(work, idx, i, linear[1])
        value = stmt.value
        single = isinstance(stmt.targets[0], ast.Name)
        if (
            single
            and isinstance(value, ast.Call)
            and _is_self_call(value)
            and len(value.args) == 1
            and not value.keywords
        ):
            if submodule(work.view, value.func.attr, value).kind == "norm" and isinstance(value.args[0], ast.Name):
                return _like(work, idx, i, value.args[0].id)
        return None
    return name if name in work.params[1:] else None


def _op_reason(work: _Work) -> str:
    """Why the site cannot be a custom op with an exact fake kernel ("" where it can)."""
    not_tensors = [p for p in work.params[1:] if p not in _tensors(work)]
    if not_tensors:
        return (
            f"{', '.join(not_tensors)} is not known to be a tensor, and every parameter of the op "
            "must be: under torch.compile the site runs upstream's statements"
        )
    if "__init__" not in vars_of(work.view.classes[0][1]):
        return (
            f"{work.view.name} defines no __init__ of its own, so its instances cannot be registered "
            "for the op to find: under torch.compile the site runs upstream's statements"
        )
    for w, names in work.returns.items():
        for name in names:
            last = next(i for i in reversed(work.found[w]) if name in names_of(work.body[i], ast.Store))
            linear = _linear_output(work.body[last], name, work)
            like = _like(work, work.found[w], last, linear[1]) if linear else None
            if linear is None or like is None:
                return (
                    f"{name} is not a vLLM linear layer's output whose input is an entry parameter (or "
                    "one through linear layers and norms), so no op can promise its shape: under "
                    "torch.compile the site runs upstream's statements"
                )
    return ""


def vars_of(cls: ast.ClassDef) -> set[str]:
    return {n.name for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def _outputs(work: _Work) -> tuple[Output, ...]:
    out = []
    for w, names in work.returns.items():
        for name in names:
            last = next(i for i in reversed(work.found[w]) if name in names_of(work.body[i], ast.Store))
            width, source = _linear_output(work.body[last], name, work)
            out.append(Output(name, like=_like(work, work.found[w], last, source), width=width))
    return tuple(out)


def _site(work: _Work, anchor: Anchor, source: str, op: bool) -> Site:
    cfg, groups = work.cfg, work.groups
    branch = {w: Branch(t, ", ".join(work.returns[w])) for w, t in groups}
    why = cfg.why or f"declared by the user in {source}"
    return Site(
        id=cfg.feature_name,
        feature=cfg.feature_name,
        summary=f"user site {cfg.id}: {len(groups)} groups of {cfg.function}",
        targets=(Target(cfg.module, cfg.function),),
        forms=(Form((anchor,), current=branch["current"], aux=tuple(branch[w] for w, _ in groups[1:])),),
        entry=ENTRY,
        params=tuple(work.params),
        tokens=cfg.tokens,
        dynamo="op" if op else "plain",
        outputs=_outputs(work) if op else (),
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


def _rule_runtime(work: _Work, proof: Proof) -> None:
    """What the runtime checks before it installs the rewrite, checked here with its reasons:
    a site prove accepts is one the runtime applies."""
    from vllm_overlap.engine.branches import compile_form
    from vllm_overlap.engine.rewrite import rewrite_source

    site = proof.site
    problems = site.problems()
    if problems:
        raise Refused("runtime", "; ".join(problems))
    feature = feature_of(proof)
    try:
        for rewrite in feature.rewrites:
            rewrite_source(work.func_text, rewrite.anchors)
        if any(isinstance(n, ast.Name) and n.id in ("super", "__class__") for n in ast.walk(work.func)):
            raise RewriteSkipped("closes over __class__: cannot be recompiled outside its scope")
        if _MANGLED.search(work.func_text):
            raise RewriteSkipped("uses a private (name-mangled) attribute")
        if feature.runtime_global in work.info.globals:
            raise RewriteSkipped(f"global name {feature.runtime_global} already used in {work.cfg.module}")
        known = {n: None for n in work.info.globals}
        compile_form(site, 0, work.func_text, known, f"<prove {work.cfg.module}>", 1)
    except RewriteSkipped as exc:
        raise Refused("runtime", f"the runtime would skip it: {exc}") from None
    except SyntaxError as exc:  # the runtime's rewrite raises it too: the site would not apply
        raise Refused(
            "runtime",
            f"the runtime would skip it: the rewritten function does not parse: {type(exc).__name__}: {exc.msg}",
        ) from None


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
        except (OSError, ModuleNotFoundError, UnicodeDecodeError, ValueError) as exc:
            proofs.append(Proof(cfg, refused=f"match: cannot read {cfg.module}: {exc}"))
            continue
        except Exception as exc:  # ours: this site's refusal, the other sites are still proven
            proofs.append(Proof(cfg, refused=internal_error(exc)))
            continue
        proofs.append(prove(cfg, text, source))
    return proofs


def rewritten_diff(proof: Proof, text: str) -> str:
    """Unified diff of the module text with the site applied (``vllm-overlap prove``)."""
    from vllm_overlap.engine.sources import rewrite_module_text

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
