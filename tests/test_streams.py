"""The stream primitive: serial fallbacks on the CPU; the real fork/join on a GPU (cuda)."""

from __future__ import annotations

import threading

import pytest
import torch

from vllm_overlap.config.loader import FeatureConfig
from vllm_overlap.runtime import streams

FEATURE = FeatureConfig(min_tokens=4, max_tokens=16)


def _pair(order):
    return (lambda: order.append("fn0") or "r0"), (lambda: order.append("fn1") or "r1")


def test_no_aux_stream_runs_serially_in_order(monkeypatch):
    assert streams.get_aux_stream() is None  # the CPU has none
    monkeypatch.setattr(streams, "_parallel_impl", lambda: pytest.fail("must not fork"))
    order = []
    assert streams.run_pair("site", *_pair(order), 8, FEATURE) == ("r0", "r1")
    assert order == ["fn0", "fn1"]
    assert streams.serial_reason(8, FEATURE, None) == "no aux stream"


@pytest.mark.parametrize("num_tokens, forks", [(3, 0), (4, 1), (16, 1), (17, 0)])
def test_token_range_gates_the_fork_at_both_bounds(fake_gpu, num_tokens, forks):
    order = []
    assert streams.run_pair("site", *_pair(order), num_tokens, FEATURE) == ("r0", "r1")
    assert order == ["fn0", "fn1"]
    assert len(fake_gpu) == forks


def test_micro_batch_threads_run_serially(fake_gpu, monkeypatch):
    monkeypatch.setattr(streams, "in_micro_batch_thread", lambda: True)
    streams.run_pair("site", *_pair([]), 8, FEATURE)
    assert fake_gpu == []
    assert streams.serial_reason(8, FEATURE, "aux") == "dual-batch-overlap micro-batch thread"


def test_breakable_cuda_graph_capture_runs_serially(fake_gpu, monkeypatch):
    """vLLM's BreakableCUDAGraphCapture active (as its capture sets it) means no fork, whatever
    vLLM's own helper checks (0.22-0.26's does not)."""
    from vllm.compilation.breakable_cudagraph import BreakableCUDAGraphCapture

    order = []
    monkeypatch.setattr(BreakableCUDAGraphCapture._tls, "active", object(), raising=False)
    assert streams.run_pair("site", *_pair(order), 8, FEATURE) == ("r0", "r1")
    assert order == ["fn0", "fn1"] and fake_gpu == []
    assert streams.serial_reason(8, FEATURE, "aux") == "breakable CUDA-graph capture"
    monkeypatch.setattr(BreakableCUDAGraphCapture._tls, "active", None)
    streams.run_pair("site", *_pair([]), 8, FEATURE)
    assert len(fake_gpu) == 1  # the same call forks once the capture is over


class _FakeStream:
    made = 0

    def __init__(self):
        _FakeStream.made += 1


@pytest.fixture
def fake_fan(monkeypatch):
    """An aux stream exists; what run_many hands vLLM's execute_in_parallel is recorded (the
    functions still run in order, on the CPU)."""
    from conftest import _FakeEvent

    calls = []

    def execute(default_fn, aux_fns, start_event, done_events, aux_streams=None, enable=False):
        calls.append((start_event, list(done_events), list(aux_streams), enable))
        return default_fn(), [fn() for fn in aux_fns]

    monkeypatch.setattr(streams, "get_aux_stream", lambda: "aux")
    monkeypatch.setattr(streams, "_extra_streams", [])
    monkeypatch.setattr(streams, "_many_impl", lambda: execute)
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    return calls


def _three(order):
    return [(lambda name=name: order.append(name) or name.upper()) for name in ("fn0", "fn1", "fn2")]


def test_three_branches_fan_out_on_vllms_aux_stream_and_one_more(fake_fan):
    order = []
    fn0, fn1, fn2 = _three(order)
    assert streams.run_many("site3", fn0, [fn1, fn2], 8, FEATURE) == ("FN0", ["FN1", "FN2"])
    assert order == ["fn0", "fn1", "fn2"]
    (start, done, aux_streams, enable), = fake_fan
    assert enable is True and len(done) == 2 and start not in done and done[0] is not done[1]
    assert aux_streams[0] == "aux" and isinstance(aux_streams[1], _FakeStream)
    streams.run_many("site3", fn0, [fn1, fn2], 8, FEATURE)
    again = fake_fan[1]
    assert again[0] is start and again[1] == done and again[2] == aux_streams  # made once, reused


@pytest.mark.parametrize("num_tokens, fans", [(3, 0), (4, 1), (16, 1), (17, 0)])
def test_the_fan_out_keeps_the_pair_rules(fake_fan, monkeypatch, num_tokens, fans):
    order = []
    assert streams.run_many("site3", *(lambda f: (f[0], f[1:]))(_three(order)), num_tokens, FEATURE)[0] == "FN0"
    assert order == ["fn0", "fn1", "fn2"] and len(fake_fan) == fans
    monkeypatch.setattr(streams, "in_micro_batch_thread", lambda: True)
    streams.run_many("site3", *(lambda f: (f[0], f[1:]))(_three([])), 8, FEATURE)
    assert len(fake_fan) == fans  # DBO threads: serial


def test_no_aux_stream_runs_every_branch_serially_in_order(monkeypatch):
    monkeypatch.setattr(streams, "_many_impl", lambda: pytest.fail("must not fan out"))
    order = []
    fn0, fn1, fn2 = _three(order)
    assert streams.run_many("site3", fn0, [fn1, fn2], 8, FEATURE) == ("FN0", ["FN1", "FN2"])
    assert order == ["fn0", "fn1", "fn2"]


def test_vllms_fan_out_helper_is_the_one_used_and_the_fallback_runs_in_order():
    from vllm.utils.multi_stream_utils import execute_in_parallel

    assert streams._many_impl() is execute_in_parallel
    order = []
    fn0, fn1, fn2 = _three(order)
    assert streams._execute_many(fn0, [fn1, fn2], None, [None, None], None) == ("FN0", ["FN1", "FN2"])
    assert order == ["fn0", "fn1", "fn2"]


def test_the_overlays_own_fork_join_orders_the_streams_as_vllms_helpers_do(monkeypatch):
    """The fallbacks for a vLLM without the helpers (one fan-out copy serves both): the pair
    enqueues fn1 on the aux stream first, after the fork event, then fn0, and joins; the
    fan-out enqueues the aux functions first, each after the start event, then fn0."""
    import contextlib

    log = []

    class Event:
        def __init__(self, name):
            self.name = name

        def record(self):
            log.append(f"record {self.name}")

        def wait(self):
            log.append(f"wait {self.name}")

    @contextlib.contextmanager
    def on(stream):
        log.append(f"on {stream}")
        yield
        log.append(f"off {stream}")

    def fn(name):
        return lambda: log.append(name) or name

    monkeypatch.setattr(torch.cuda, "stream", on)
    monkeypatch.setattr(streams, "_many_impl", lambda: streams._execute_many)
    # the pair: the aux branch enqueued first (vLLM 0.34's execute_in_parallel order), then fn0
    assert streams._pair_aux_first(fn("fn0"), fn("fn1"), Event("e0"), Event("e1"), "aux") == ("fn0", "fn1")
    assert log == ["record e0", "on aux", "wait e0", "fn1", "record e1", "off aux", "fn0", "wait e1"]
    log.clear()
    done = [Event("d1"), Event("d2")]
    result = streams._execute_many(fn("fn0"), [fn("fn1"), fn("fn2")], Event("s"), done, ["a1", "a2"], enable=True)
    assert result == ("fn0", ["fn1", "fn2"])
    assert log == [
        "record s",
        "on a1", "wait s", "fn1", "record d1", "off a1",
        "on a2", "wait s", "fn2", "record d2", "off a2",
        "fn0", "wait d1", "wait d2",
    ]
    log.clear()
    assert streams._pair_aux_first(fn("fn0"), fn("fn1"), None, None, None) == ("fn0", "fn1")
    assert log == ["fn0", "fn1"]  # no aux stream: serially, in order


def test_events_are_per_site_and_per_thread_and_reused(fake_gpu):
    streams.run_pair("a", *_pair([]), 8, FEATURE)
    streams.run_pair("a", *_pair([]), 8, FEATURE)
    streams.run_pair("b", *_pair([]), 8, FEATURE)
    other = threading.Thread(target=lambda: streams.run_pair("a", *_pair([]), 8, FEATURE))
    other.start()
    other.join()
    a1, a2, b, a_other = fake_gpu
    assert a1[:2] == a2[:2]  # lazily made once per site, then reused
    assert {id(e) for e in a1[:2]}.isdisjoint(id(e) for e in b[:2])
    assert {id(e) for e in a1[:2]}.isdisjoint(id(e) for e in a_other[:2])
    assert a_other[3] != a1[3]


def test_the_pair_forks_through_vllms_fan_out_helper_aux_first(monkeypatch):
    """The pair goes through vLLM's execute_in_parallel with one aux branch and the default
    order (aux first), never maybe_execute_in_parallel (fn0 first)."""
    from vllm.utils.multi_stream_utils import execute_in_parallel

    assert streams._many_impl() is execute_in_parallel
    calls = []

    def many(default_fn, aux_fns, start, done, aux_streams=None, enable=False, **kwargs):
        calls.append((start, done, aux_streams, enable, kwargs))
        return default_fn(), [fn() for fn in aux_fns]

    monkeypatch.setattr(streams, "_many_impl", lambda: many)
    assert streams._parallel_impl()(lambda: 0, lambda: 1, "e0", "e1", "aux") == (0, 1)
    assert calls == [("e0", ["e1"], ["aux"], True, {})]  # no default_first: aux first


def test_when_capture_forks_only_while_a_graph_is_captured(fake_gpu, monkeypatch):
    capture = FeatureConfig(min_tokens=4, max_tokens=16)
    assert capture.when == "capture"
    always = FeatureConfig(min_tokens=4, max_tokens=16, when="always")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: "current")  # eager: record_stream's
    streams.run_pair("site", *_pair([]), 8, capture)
    assert fake_gpu == []
    assert streams.serial_reason(8, capture, "aux").startswith("eager step")
    streams.run_pair("site", *_pair([]), 8, always)
    assert len(fake_gpu) == 1
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    streams.run_pair("site", *_pair([]), 8, capture)
    assert len(fake_gpu) == 2


# ----------------------------------------------------------------------------- GPU only

cuda = pytest.mark.cuda


@pytest.fixture
def gpu_aux(monkeypatch):
    monkeypatch.setattr(streams, "get_aux_stream", lambda: _AUX)
    return _AUX


_AUX = torch.cuda.Stream() if torch.cuda.is_available() else None


@cuda
def test_gpu_fan_out_of_three_equals_serial_and_replays_in_a_graph(gpu_aux):
    """Three GEMM branches through vLLM's execute_in_parallel on two aux streams: the same
    bits as serially, eagerly and replayed from a CUDA graph."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(8, 256, device="cuda", generator=gen, dtype=torch.bfloat16)
    ws = [torch.randn(n, 256, device="cuda", generator=gen, dtype=torch.bfloat16) for n in (512, 64, 96)]
    fns = [lambda w=w: x @ w.T for w in ws]
    expected = [fn() for fn in fns]
    r0, rest = streams.run_many("fan3", fns[0], fns[1:], 8, FEATURE)
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip([r0, *rest], expected))
    graph = torch.cuda.CUDAGraph()
    streams.run_many("fan3", fns[0], fns[1:], 8, FEATURE)  # warm up outside capture
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        g0, grest = streams.run_many("fan3", fns[0], fns[1:], 8, FEATURE)
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip([g0, *grest], expected))


@cuda
def test_gpu_fork_join_equals_serial(gpu_aux):
    a = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16)
    w0 = torch.randn(4096, 8192, device="cuda", dtype=torch.bfloat16)
    w1 = torch.randn(4096, 64, device="cuda", dtype=torch.bfloat16)
    feature = FeatureConfig(min_tokens=1, max_tokens=1024, when="always")  # an eager fork
    r0, r1 = streams.run_pair("gpu", lambda: a @ w0, lambda: a @ w1, 64, feature)
    torch.cuda.synchronize()
    assert torch.equal(r0, a @ w0) and torch.equal(r1, a @ w1)


@cuda
def test_gpu_region_captures_and_replays_in_a_cuda_graph(gpu_aux):
    a = torch.randn(8, 2048, device="cuda", dtype=torch.bfloat16)
    w0 = torch.randn(2048, 4096, device="cuda", dtype=torch.bfloat16)
    w1 = torch.randn(2048, 32, device="cuda", dtype=torch.bfloat16)
    feature = FeatureConfig(min_tokens=1, max_tokens=1024)
    streams.run_pair("graph", lambda: a @ w0, lambda: a @ w1, 8, feature)  # warm up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        r0, r1 = streams.run_pair("graph", lambda: a @ w0, lambda: a @ w1, 8, feature)
    a.copy_(torch.randn_like(a))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(r0, a @ w0) and torch.equal(r1, a @ w1)


class _Recorder:
    """Stand-in for vLLM's fork/join helper: logs what each thread did, in order."""

    def __init__(self):
        self.log = []
        self.lock = threading.Lock()

    def note(self, *entry):
        with self.lock:
            self.log.append((threading.get_ident(), *entry))

    def __call__(self, fn0, fn1, event0, event1, aux):
        self.note("fork", id(event0), id(event1))
        r0 = fn0()
        r1 = fn1()
        self.note("join", id(event0), id(event1))
        return r0, r1


@pytest.mark.parametrize("micro_batches", [False, True], ids=["plain-threads", "dbo-threads"])
def test_two_threads_never_share_events_and_keep_their_order(fake_gpu, monkeypatch, micro_batches):
    recorder = _Recorder()
    monkeypatch.setattr(streams, "_parallel_impl", lambda: recorder)
    monkeypatch.setattr(streams, "in_micro_batch_thread", lambda: micro_batches)
    barrier = threading.Barrier(2)

    def worker(tag):
        barrier.wait()
        for i in range(200):
            streams.run_pair(
                "gdn_in_proj",
                lambda i=i: recorder.note("fn0", tag, i),
                lambda i=i: recorder.note("fn1", tag, i),
                8,
                FEATURE,
            )

    threads = [threading.Thread(target=worker, args=(t,)) for t in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    by_thread = {}
    for entry in recorder.log:
        by_thread.setdefault(entry[0], []).append(entry[1:])
    assert len(by_thread) == 2
    events = []
    for seq in by_thread.values():
        kinds = [e[0] for e in seq]
        if micro_batches:
            assert kinds == ["fn0", "fn1"] * 200  # serial: no fork at all
        else:
            assert kinds == ["fork", "fn0", "fn1", "join"] * 200
            events.append({x for e in seq if e[0] in ("fork", "join") for x in e[1:]})
        calls = [e[2] for e in seq if e[0] in ("fn0", "fn1")]
        assert calls == [i for i in range(200) for _ in (0, 1)]
    if not micro_batches:
        assert len(events[0]) == 2 and events[0].isdisjoint(events[1])


def test_doctor_reports_the_micro_batch_policy():
    from vllm_overlap.cli.doctor import doctor_report

    report = {
        "vllm-overlap": "x", "vllm": "v", "torch": "t", "platform": "p", "config": "c",
        "config_fingerprint": "f", "strict": False, "dual_batch_overlap": streams.DBO_POLICY,
        "rows": [{"feature": "f", "target": "t", "enabled": True, "anchors": "1/1", "result": "applied"}],
        "ok": True,
    }
    assert f"DBO:      {streams.DBO_POLICY}" in doctor_report(report)
