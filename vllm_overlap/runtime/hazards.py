"""The dynamic check of a site's branches: what the static proof cannot see.

:func:`run_checked` runs a site's branches one after another (upstream's order, one stream)
under a dispatch recorder that follows tensor storages by lifetime: every storage an op inside
a branch reads or writes, and every tensor it makes, is kept alive until the check ends, so no
two storages compared can share an address. An op's result is a write only when it is new
memory or its schema marks it written (a view of an input writes nothing). Its findings:

- a storage one branch writes that another reads or writes (they would race on two streams);
- a collective (a c10d or vLLM communication op) in any branch (collectives stay on the main
  stream, in order on every rank).

:func:`check_region` runs upstream's statements in upstream's order (the branches and the
statements the rewrite moves after them, each marked) on copies of the arguments that keep
their aliasing, and finds a moved statement that writes memory a branch it is moved after
reads or writes, or reads memory that branch writes.

User sites run both the first time they run in each process, and again for every new
combination of argument aliasing and shape class (:func:`combination`), outside CUDA-graph
capture; a finding turns the site off for the process (``site_runtime``). The test harness
runs :func:`run_checked` on every built-in site.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

COLLECTIVE_NAMES = (
    "allreduce",
    "all_reduce",
    "allgather",
    "all_gather",
    "reduce_scatter",
    "broadcast",
    "alltoall",
    "all_to_all",
)


def is_collective(func) -> bool:
    name = func._schema.name.lower()
    namespace = name.split("::", 1)[0]
    return namespace in ("c10d", "_c10d_functional", "c10d_functional") or any(c in name for c in COLLECTIVE_NAMES)


def _storage(t) -> int | None:
    if not isinstance(t, torch.Tensor):
        return None
    storage = t.untyped_storage()
    return storage.data_ptr() if storage.nbytes() > 0 else None


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.branch: str | None = None
        self.reads: dict[str, set[int]] = {}
        self.writes: dict[str, set[int]] = {}
        self.collectives: list[tuple[str, str]] = []
        self._alive: list[torch.Tensor] = []

    def _touch(self, t, written: bool) -> None:
        key = _storage(t)
        if key is None or self.branch is None:
            return
        self._alive.append(t)
        self.reads.setdefault(self.branch, set()).add(key)
        if written:
            self.writes.setdefault(self.branch, set()).add(key)

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        schema = func._schema
        if self.branch is not None:
            if is_collective(func):
                self.collectives.append((self.branch, schema.name))
            written = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
            named = list(zip((a.name for a in schema.arguments), args)) + list(kwargs.items())
            for arg_name, value in named:
                for t in tree_leaves(value):
                    self._touch(t, arg_name in written)
        result = func(*args, **kwargs)
        if self.branch is not None:
            results = result if isinstance(result, (tuple, list)) and len(schema.returns) > 1 else (result,)
            for ret, value in zip(schema.returns, results):
                fresh_or_written = ret.alias_info is None or ret.alias_info.is_write
                for t in tree_leaves(value):
                    self._touch(t, fresh_or_written)
        return result

    def finding(self, pairs: tuple[tuple[str, str], ...] | None = None) -> str | None:
        """The first hazard found, as a reason (None: none): between every two branches, or
        only between the two of each pair of ``pairs``."""
        if self.collectives:
            branch, name = self.collectives[0]
            return f"the {branch} branch runs a collective ({name})"
        names = list(self.reads)
        if pairs is None:
            pairs = tuple((a, b) for a in names for b in names if a != b)
        else:
            pairs = pairs + tuple((b, a) for a, b in pairs)
        for a, b in pairs:
            shared = self.writes.get(a, set()) & (self.reads.get(b, set()) | self.writes.get(b, set()))
            if shared:
                what = "branch " if not a.startswith("moved") else ""
                return f"the {a} {what}writes memory the {b} branch uses ({len(shared)} storage(s))"
        return None


def run_checked(branches: dict[str, Callable[[], Any]], order: tuple[str, ...]) -> tuple[dict[str, Any], str | None]:
    """Each branch's result, run in ``order`` under the recorder, and the first finding (None:
    the branches share no memory any of them writes and run no collective)."""
    recorder = _Recorder()
    results: dict[str, Any] = {}
    with recorder:
        for name in order:
            recorder.branch = name
            results[name] = branches[name]()
        recorder.branch = None
    return results, recorder.finding()


def check_region(region: Callable, branches: dict[str, Callable], args: tuple, pairs) -> str | None:
    """The first hazard between a moved statement and a branch it is moved after (None:
    none), from upstream's statements run in upstream's order on copies of ``args[1:]``."""
    recorder = _Recorder()

    def mark(label: str | None) -> None:
        recorder.branch = label

    with torch.no_grad():
        copies = (args[0], *copy_keeping_aliasing(args[1:]))
        with recorder:
            region(mark, branches, *copies)
        recorder.branch = None
    return recorder.finding(tuple(pairs))


def copy_keeping_aliasing(values: tuple) -> tuple:
    """Each tensor copied into new memory, two that share a storage sharing the copy of it."""
    storages: dict[int, Any] = {}
    out = []
    for value in values:
        if not isinstance(value, torch.Tensor):
            out.append(value)
            continue
        storage = value.untyped_storage()
        key = storage.data_ptr() if storage.nbytes() else id(value)
        if key not in storages:
            storages[key] = storage.clone()
        copy = torch.empty(0, dtype=value.dtype, device=value.device)
        out.append(copy.set_(storages[key], value.storage_offset(), value.size(), value.stride()))
    return tuple(out)


def combination(args: tuple) -> tuple:
    """What a hazard may depend on in a call's arguments (``args[1:]``): each tensor's shape
    class (first dimension 0, 1 or more; the others exact), dtype, device and contiguity, each
    other value's type, and which arguments share a storage."""
    parts, storages = [], []
    for value in args[1:]:
        if isinstance(value, torch.Tensor):
            shape = tuple(value.shape)
            parts.append(
                (min(shape[0], 2) if shape else -1, shape[1:], value.dtype, value.device.type, value.is_contiguous())
            )
            storage = value.untyped_storage()
            storages.append(storage.data_ptr() if storage.nbytes() else None)
        else:
            parts.append(type(value).__name__)
            storages.append(None)
    shared = tuple(
        (i, j)
        for i in range(len(storages))
        for j in range(i + 1, len(storages))
        if storages[i] is not None and storages[i] == storages[j]
    )
    return tuple(parts), shared
