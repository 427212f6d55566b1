"""The stream primitive's stand-in for fork/join tests, without a GPU.

``Recorder`` replaces ``vllm_overlap.runtime.streams.run_pair`` and ``run_many``: it logs the fork,
runs fn0 as "branch 0" (the current stream), fn1 as "branch 1" (the aux stream; a fan-out's
further functions as branches 2, 3...), and logs the join.
Wrapped submodules and functions log each call with the branch it ran on, so a test can
assert the exact sequence: which statements went to which stream, and that every consumer
of a region's outputs runs after its join. Under ``Recorder.run`` a TorchDispatchMode records,
per branch, which storages each aten/custom op read and wrote: nothing one branch writes may
be read or written by another (they would race on a GPU).

Storages are followed by lifetime, not by address: every tensor an op inside a fork touches
or makes is kept alive until the recording ends, so no two storages the check compares can
share an address (a CPU allocator hands a freed temporary of one branch to the other; a GPU's
caching allocator would not, across streams). An op's result is a write only when it is new
memory or its schema marks it written: a view (``view``, ``slice``, ``t``...) of an input
aliases it and writes nothing.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from vllm_overlap.runtime import streams

OUT = "outside"


def fork(site):
    return ("fork", site)


def join(site):
    return ("join", site)


def b0(site, name):
    return (f"{site}:branch0", name)


def b1(site, name):
    return (f"{site}:branch1", name)


def out(*names):
    return [(OUT, name) for name in names]


class Recorder:
    """The stream primitive's stand-in and the log every wrapped call writes to."""

    def __init__(self, monkeypatch):
        self.monkeypatch = monkeypatch
        self.log: list[tuple[str, str]] = []
        self.stack: list[tuple[int, str, int]] = []  # (fork id, site, branch) innermost last
        self.forks: list[str] = []  # site of each fork, by id
        self.widths: list[int] = []  # how many branches each fork ran, by id
        self.accesses: list[tuple[tuple, int, bool]] = []  # (stack, storage, written)
        self._alive: list[torch.Tensor] = []  # no storage is freed and reused mid-run
        monkeypatch.setattr(streams, "run_pair", self.run_pair)
        monkeypatch.setattr(streams, "run_many", self.run_many)

    # ---- the stream primitive --------------------------------------------------------------

    def _fan(self, site, fns) -> list:
        fork_id = len(self.forks)
        self.forks.append(site)
        self.widths.append(len(fns))
        self.log.append(fork(site))
        results = []
        for branch, fn in enumerate(fns):
            self.stack.append((fork_id, site, branch))
            try:
                results.append(fn())
            finally:
                self.stack.pop()
        self.log.append(join(site))
        return results

    def run_pair(self, site, fn0, fn1, num_tokens, feature):
        r0, r1 = self._fan(site, [fn0, fn1])
        return r0, r1

    def run_many(self, site, fn0, aux_fns, num_tokens, feature):
        r0, *rest = self._fan(site, [fn0, *aux_fns])
        return r0, rest

    def where(self) -> str:
        if not self.stack:
            return OUT
        _, site, branch = self.stack[-1]
        return f"{site}:branch{branch}"

    # ---- call logging ---------------------------------------------------------------------

    def wrap(self, owner, attr: str, name: str) -> None:
        """Log ``name`` on the current branch whenever ``owner.attr`` is called."""
        real = getattr(owner, attr)

        def logged(*args, **kwargs):
            self.log.append((self.where(), name))
            return real(*args, **kwargs)

        self.monkeypatch.setattr(owner, attr, logged, raising=False)

    def wrap_module(self, module: torch.nn.Module, name: str) -> None:
        self.wrap(module, "forward", name)

    def run(self, fn):
        """Run ``fn`` with the log cleared and storage accesses recorded; return its result."""
        self.log.clear()
        self.forks.clear()
        self.widths.clear()
        self.accesses.clear()
        self._alive.clear()
        with _AccessMode(self):
            result = fn()
        assert not self.stack
        return result

    # ---- storage accesses -----------------------------------------------------------------

    def branch_accesses(self, fork_id: int, branch: int):
        """(read storages, written storages) of everything that ran in one branch of a fork,
        nested forks included."""
        reads, writes = set(), set()
        for stack, storage, written in self.accesses:
            if any(f == fork_id and b == branch for f, _, b in stack):
                (writes if written else reads).add(storage)
        return reads, writes

    def assert_no_cross_branch_hazard(self) -> None:
        assert self.forks, "no region forked"
        for fork_id, site in enumerate(self.forks):
            accesses = [self.branch_accesses(fork_id, b) for b in range(self.widths[fork_id])]
            for a, (reads_a, writes_a) in enumerate(accesses):
                assert reads_a, f"{site}: branch {a} read nothing (accesses not recorded?)"
                for b, (reads_b, writes_b) in enumerate(accesses):
                    if a != b:
                        assert not writes_a & (reads_b | writes_b), f"{site}: branch {a} writes what branch {b} uses"


def _storage_key(t) -> int | None:
    """The identity of a tensor's storage while it is alive (None: no memory)."""
    if not isinstance(t, torch.Tensor):
        return None
    storage = t.untyped_storage()
    return storage.data_ptr() if storage.nbytes() > 0 else None


class _AccessMode(TorchDispatchMode):
    """Records, for every op that runs inside a fork, each tensor argument's storage and
    whether the op's schema writes it, and each result's storage when the result is new or
    written; keeps every such tensor alive until the run ends."""

    def __init__(self, recorder: Recorder):
        super().__init__()
        self.recorder = recorder

    def _touch(self, t, stack, written: bool) -> None:
        key = _storage_key(t)
        if key is not None:
            self.recorder._alive.append(t)  # its address cannot be reused while we compare
            self.recorder.accesses.append((stack, key, written))

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        rec = self.recorder
        stack = tuple(rec.stack)
        schema = func._schema
        if stack:
            written = {
                a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write
            }
            named = list(zip((a.name for a in schema.arguments), args)) + list(kwargs.items())
            for arg_name, value in named:
                for t in tree_leaves(value):
                    self._touch(t, stack, False)  # in-place ops read too
                    if arg_name in written:
                        self._touch(t, stack, True)
        result = func(*args, **kwargs)
        if stack:
            results = result if isinstance(result, (tuple, list)) and len(schema.returns) > 1 else (result,)
            for ret, value in zip(schema.returns, results):
                # a return that aliases an input without writing it (a view) is no write
                fresh_or_written = ret.alias_info is None or ret.alias_info.is_write
                for t in tree_leaves(value):
                    self._touch(t, stack, fresh_or_written)
        return result


def without_forks(log):
    """The calls of a log in order, without fork/join and branches."""
    return [name for where, name in log if where not in ("fork", "join")]
