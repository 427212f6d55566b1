"""Fork/join of two independent callables on the current stream and vLLM's aux stream.

``run_pair(site, fn0, fn1, num_tokens, feature)`` returns ``(fn0(), fn1())``. It runs them
concurrently (fn0 on the current stream, fn1 on the aux stream) only when all hold:

- vLLM has an aux stream (``vllm.utils.torch_utils.aux_stream()``: CUDA / ROCm only);
- ``feature.min_tokens <= num_tokens <= feature.max_tokens``;
- no breakable CUDA-graph capture is active (checked here: vLLM's ``execute_in_parallel`` does
  not check it, and 0.22 onwards capture breakably);
- the caller is not a dual-batch-overlap micro-batch thread (those have streams of their own);
- with the feature's ``when: capture`` (the default), a CUDA graph is being captured: the graph
  replays the fork, eager steps run serially (``when: always`` forks in eager steps too).

Otherwise it calls fn0 then fn1 on the current stream: the same computation, serially.
Forking, the aux branch is enqueued first (vLLM's ``execute_in_parallel`` order).

``run_many(site, fn0, aux_fns, num_tokens, feature)`` is the same for a site of three or more
branches: each aux function on an aux stream of its own (vLLM's aux stream, then streams the
overlay makes once per process where vLLM made its own), through vLLM's ``execute_in_parallel``
(one start event fanned out, one done event per branch joined), under the same rules.

Ordering: fn1 is enqueued on the aux stream before fn0 on the current one; the aux stream
waits for the current stream before fn1 reads its inputs; the
current stream waits for the aux stream before returning, so every consumer runs after the
join. Outputs made on the aux stream are ``record_stream``-ed on the current stream outside
graph capture, so the caching allocator cannot hand their memory out early. Events are made
lazily per call site and per thread (never shared by two threads), with ``enable_timing=False``,
and only where vLLM made the aux stream (the same platform check).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # torch only at run time: benchmarks/pairs.py runs without vLLM or pydantic
    from vllm_overlap.config.loader import FeatureConfig

# What happens inside vLLM's dual-batch-overlap (--enable-dbo) micro-batch threads. Each
# micro-batch runs on compute/comm streams of its own; one global aux stream shared by both
# would tie them together, so the primitive does not fork there (doctor prints this).
DBO_POLICY = "serial inside dual-batch-overlap micro-batch threads (no shared aux stream or events)"

_events: dict[tuple[str, int], tuple[Any, Any]] = {}
_events_lock = threading.Lock()


_UNSET = object()
_aux: Any = _UNSET  # vLLM's aux stream (or None), looked up once: it never changes in a process
_dbo_enabled: Callable[[], bool] | None = None
_breakable_active: Callable[[], bool] | None = None
_many: Callable[..., tuple[Any, list]] | None = None
_extra_streams: list = []  # the overlay's own aux streams beyond vLLM's one (sites of 3+ branches)


def get_aux_stream():
    """vLLM's one global aux stream, or None (CPU, or a vLLM without it)."""
    global _aux
    if _aux is _UNSET:
        try:
            from vllm.utils.torch_utils import aux_stream
        except ImportError:
            _aux = None
        else:
            _aux = aux_stream()
    return _aux


def in_micro_batch_thread() -> bool:
    """True inside a dual-batch-overlap (``--enable-dbo``) micro-batch thread."""
    global _dbo_enabled
    if _dbo_enabled is None:
        try:
            from vllm.v1.worker.ubatching import dbo_enabled
        except ImportError:

            def dbo_enabled() -> bool:
                return False

        _dbo_enabled = dbo_enabled
    return _dbo_enabled()


def in_breakable_capture() -> bool:
    """True while vLLM captures a breakable CUDA graph (a fork must not span its eager breaks)."""
    global _breakable_active
    if _breakable_active is None:
        try:
            from vllm.compilation.breakable_cudagraph import BreakableCUDAGraphCapture
        except ImportError:  # a vLLM without breakable capture (before 0.22): none to detect

            def none_active() -> bool:
                return False

            _breakable_active = none_active
        else:
            _breakable_active = BreakableCUDAGraphCapture.is_active
    return _breakable_active()


def _parallel_impl() -> Callable[..., tuple[Any, Any]]:
    """The pair's fork/join: vLLM's ``execute_in_parallel`` with one aux branch (or the
    overlay's copy of it), which enqueues the aux branch first (vLLM 0.34's GDN order:
    main-first regressed block-FP8 from ~100 tokens), not ``maybe_execute_in_parallel``'s fn0
    first."""
    return _pair_aux_first


def _pair_aux_first(fn0, fn1, event0, event1, aux_stream=None):
    """fn1 on ``aux_stream`` enqueued first, after ``event0``; fn0 on the current stream; the
    current stream joins ``event1``. Serially, fn0 then fn1, without an aux stream."""
    streams = None if aux_stream is None else [aux_stream]
    result0, (result1,) = _many_impl()(fn0, [fn1], event0, [event1], streams, enable=streams is not None)
    return result0, result1


def _execute_many(
    default_fn, aux_fns, start_event, done_events, aux_streams=None, enable=False, default_first=False
):
    """vLLM's ``execute_in_parallel`` as 0.33-0.34 have it, for a vLLM without it (0.20.0):
    each aux function on its stream after ``start_event``, then ``default_fn``, the current
    stream joining every ``done_events[i]``; ``default_first`` enqueues ``default_fn`` first."""
    if aux_streams is None or not enable:
        return default_fn(), [fn() for fn in aux_fns]
    start_event.record()
    if default_first:
        default_result = default_fn()
    results = []
    for fn, stream, done in zip(aux_fns, aux_streams, done_events):
        with torch.cuda.stream(stream):
            start_event.wait()
            results.append(fn())
            done.record()
    if not default_first:
        default_result = default_fn()
    for done in done_events:
        done.wait()
    return default_result, results


def _many_impl() -> Callable[..., tuple[Any, list]]:
    global _many
    if _many is None:
        try:
            from vllm.utils.multi_stream_utils import execute_in_parallel
        except ImportError:  # vLLM 0.20.0: the same fan-out/join, the overlay's copy
            _many = _execute_many
        else:
            _many = execute_in_parallel
    return _many


def get_aux_streams(n: int) -> list | None:
    """``n`` aux streams, vLLM's first, then streams of the overlay's own (made once per
    process, only where vLLM made its aux stream); None where there is no aux stream."""
    aux = get_aux_stream()
    if aux is None:
        return None
    with _events_lock:
        while len(_extra_streams) < n - 1:
            _extra_streams.append(torch.cuda.Stream())
    return [aux, *_extra_streams[: n - 1]]


def site_events(site: str) -> tuple[Any, Any]:
    """The (fork, join) event pair of a call site for the calling thread."""
    key = (site, threading.get_ident())
    pair = _events.get(key)
    if pair is None:
        with _events_lock:
            pair = _events.get(key)
            if pair is None:
                pair = (
                    torch.cuda.Event(enable_timing=False),
                    torch.cuda.Event(enable_timing=False),
                )
                _events[key] = pair
    return pair


def serial_reason(num_tokens: int, feature: "FeatureConfig", aux: Any) -> str | None:
    """Why this call runs serially (None: it may overlap)."""
    if aux is None:
        return "no aux stream"
    if not feature.overlaps(num_tokens):
        return f"{num_tokens} tokens outside [{feature.min_tokens}, {feature.max_tokens}]"
    if in_micro_batch_thread():
        return "dual-batch-overlap micro-batch thread"
    if in_breakable_capture():
        return "breakable CUDA-graph capture"
    if feature.when == "capture" and not torch.cuda.is_current_stream_capturing():
        return "eager step (when: capture forks only while a CUDA graph is captured)"
    return None


def _protect(result: Any, stream: Any) -> None:
    if isinstance(result, torch.Tensor):
        result.record_stream(stream)
    elif isinstance(result, (tuple, list)):
        for item in result:
            _protect(item, stream)


def run_pair(
    site: str,
    fn0: Callable[[], Any],
    fn1: Callable[[], Any],
    num_tokens: int,
    feature: "FeatureConfig",
) -> tuple[Any, Any]:
    aux = get_aux_stream()
    if serial_reason(num_tokens, feature, aux) is not None:
        return fn0(), fn1()
    return fork_join(site, fn0, fn1, aux)


def site_fan_events(site: str, n: int) -> tuple[Any, list]:
    """The (start, [done per aux branch]) events of an ``n``-aux-branch call site for the
    calling thread: the two-branch site's pair extended by ``n - 1`` more done events."""
    start, first_done = site_events(site)
    key = (f"{site}#more", threading.get_ident())
    more = _events.get(key)
    if more is None or len(more) < n - 1:
        with _events_lock:
            more = tuple(torch.cuda.Event(enable_timing=False) for _ in range(n - 1))
            _events[key] = more
    return start, [first_done, *more[: n - 1]]


def run_many(
    site: str,
    fn0: Callable[[], Any],
    aux_fns: list[Callable[[], Any]],
    num_tokens: int,
    feature: "FeatureConfig",
) -> tuple[Any, list]:
    """``(fn0(), [fn() for fn in aux_fns])``: fn0 on the current stream beside each aux
    function on an aux stream of its own (vLLM's ``execute_in_parallel``), under the rules of
    ``run_pair``; serially, fn0 first then the others in order, where those say so."""
    aux = get_aux_stream()
    if serial_reason(num_tokens, feature, aux) is not None:
        return fn0(), [fn() for fn in aux_fns]
    return fork_join_many(site, fn0, aux_fns, get_aux_streams(len(aux_fns)))


def fork_join_many(site: str, fn0: Callable[[], Any], aux_fns: list, aux_streams: list) -> tuple[Any, list]:
    """fn0 on the current stream beside ``aux_fns[i]`` on ``aux_streams[i]``, always."""
    start, done = site_fan_events(site, len(aux_fns))
    result0, results = _many_impl()(fn0, list(aux_fns), start, done, aux_streams, enable=True)
    if not torch.cuda.is_current_stream_capturing():
        _protect(list(results), torch.cuda.current_stream())
    return result0, list(results)


def fork_join(site: str, fn0: Callable[[], Any], fn1: Callable[[], Any], aux: Any) -> tuple[Any, Any]:
    """fn0 on the current stream beside fn1 on ``aux``, always (``run_pair`` decides when):
    the fork/join every site runs, for callers that bring their own aux stream (the pair
    benchmark, which runs without vLLM)."""
    event0, event1 = site_events(site)
    result0, result1 = _parallel_impl()(fn0, fn1, event0, event1, aux)
    if not torch.cuda.is_current_stream_capturing():
        _protect(result1, torch.cuda.current_stream())
    return result0, result1
