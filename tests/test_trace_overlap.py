"""gpu/trace_overlap.py on synthetic Chrome traces shaped like torch.profiler's."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "gpu"))

import trace_overlap  # noqa: E402

PID, TID = 100, 7


def annotation(name, ts, dur, tid=TID):
    return {"ph": "X", "cat": "user_annotation", "name": name, "pid": PID, "tid": tid, "ts": ts, "dur": dur}


def launch(corr, ts, tid=TID):
    return {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "pid": PID, "tid": tid,
            "ts": ts, "dur": 2, "args": {"correlation": corr}}


def kernel(corr, stream, ts, dur, name="sm90_xmma_gemm_bf16"):
    return {"ph": "X", "cat": "kernel", "name": name, "pid": 0, "tid": stream, "ts": ts, "dur": dur,
            "args": {"correlation": corr, "stream": stream, "device": 0}}


def step(qkvz_stream, qkvz_at, ba_stream, ba_at, qkvz_dur=20.0, ba_dur=5.0, offset=0.0):
    """One GDN layer: in_proj_qkvz launched in its range, then in_proj_ba in its own."""
    o = offset
    return [
        annotation("vllm_overlap_branch:model.layers.0.linear_attn.in_proj_qkvz", o + 0, 10),
        launch(o + 1, o + 2),
        kernel(o + 1, qkvz_stream, o + qkvz_at, qkvz_dur),
        annotation("vllm_overlap_branch:model.layers.0.linear_attn.in_proj_ba", o + 12, 10),
        launch(o + 2, o + 14),
        kernel(o + 2, ba_stream, o + ba_at, ba_dur),
    ]


def check(events):
    return trace_overlap.check({"traceEvents": events}, "in_proj_qkvz", "in_proj_ba")


def test_intersecting_kernels_on_two_streams_are_overlap():
    verdict = check(step(7, 30.0, 20, 35.0))
    assert verdict.overlap and verdict.pairs == 1
    assert verdict.longest_us == 5.0 and verdict.streams == ((7,), (20,))
    assert verdict.line().startswith("overlap: kernels of both branches ran at once on two streams")


def test_disjoint_kernels_on_two_streams_are_not():
    verdict = check(step(7, 30.0, 20, 50.0))  # qkvz ends at 50, ba starts at 50
    assert not verdict.overlap
    assert verdict.reason == "the branches ran on different streams, one after the other"


def test_one_stream_is_not_overlap_even_when_times_touch():
    verdict = check(step(7, 30.0, 7, 35.0))
    assert not verdict.overlap and verdict.reason == "both branches ran on one stream"


def test_kernels_are_attributed_by_the_launch_not_by_the_kernel_time():
    """The ba kernel runs while the qkvz range is long over; its launch lies in the ba range."""
    events = step(7, 100.0, 20, 110.0)
    kernels = trace_overlap.branch_kernels({"traceEvents": events}, {"b0": "in_proj_qkvz", "b1": "in_proj_ba"})
    assert [(k.branch, k.stream) for k in kernels] == [("b0", 7), ("b1", 20)]


def test_other_threads_and_unannotated_kernels_belong_to_no_branch():
    events = step(7, 30.0, 20, 35.0)
    events += [launch(99, 3, tid=8), kernel(99, 30, 31.0, 50.0)]  # another thread, inside the time
    events += [launch(98, 30), kernel(98, 30, 30.0, 50.0)]  # this thread, outside any range
    verdict = check(events)
    assert verdict.kernels == (1, 1) and verdict.pairs == 1


def test_innermost_range_wins():
    events = [
        annotation("vllm_overlap_branch:x.in_proj_ba", 0, 100),  # an outer range of the other label
        annotation("vllm_overlap_branch:x.in_proj_qkvz", 10, 10),
        launch(1, 12),
        kernel(1, 7, 30.0, 10.0),
    ]
    kernels = trace_overlap.branch_kernels({"traceEvents": events}, {"b0": "in_proj_qkvz", "b1": "in_proj_ba"})
    assert [k.branch for k in kernels] == ["b0"]


def test_no_kernels_for_a_branch_says_which():
    events = step(7, 30.0, 20, 35.0)[:3]
    verdict = check(events)
    assert not verdict.overlap and verdict.reason == "no kernels found for 'in_proj_ba'"


def test_cli_reads_gzip_and_exits_by_verdict(tmp_path):
    good, bad = tmp_path / "good.json.gz", tmp_path / "bad.json"
    with gzip.open(good, "wt") as fh:
        json.dump({"traceEvents": step(7, 30.0, 20, 35.0)}, fh)
    bad.write_text(json.dumps({"traceEvents": step(7, 30.0, 7, 35.0)}))
    script = os.path.join(ROOT, "gpu", "trace_overlap.py")
    args = ["--branch0", "in_proj_qkvz", "--branch1", "in_proj_ba"]
    ok = subprocess.run([sys.executable, script, str(good), *args], capture_output=True, text=True)
    no = subprocess.run([sys.executable, script, str(bad), *args], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.startswith("overlap:")
    assert no.returncode == 1 and no.stdout.startswith("no overlap:")
