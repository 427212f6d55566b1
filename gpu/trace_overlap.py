"""Did the two branches of a site really run at the same time? Read it off a profiler trace.

    python gpu/trace_overlap.py TRACE.json[.gz] --branch0 in_proj_qkvz --branch1 in_proj_ba

``TRACE.json`` is a Chrome trace from ``torch.profiler`` (``export_chrome_trace``) of steps
run with the overlay on, where each branch's CPU-side call ran inside a
``torch.profiler.record_function`` range whose name contains the branch's label (the GPU
suite wraps each projection's ``forward`` so). A GPU kernel belongs to a branch when the
runtime call that launched it (same ``correlation`` id) lies inside that branch's range on the
same CPU thread. The verdict is ``overlap`` when some kernel of branch 0 and some kernel of
branch 1 ran on two different streams with intersecting [start, end] intervals, ``no
overlap`` otherwise (with the reason: no kernels found for a branch, one stream only, or
disjoint in time). Plain Python: no torch needed to check a trace.
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
import sys
from dataclasses import dataclass

RUNTIME_CATEGORIES = ("cuda_runtime", "cuda_driver", "runtime")
KERNEL_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


@dataclass(frozen=True)
class Kernel:
    name: str
    stream: int
    start: float  # us
    end: float  # us
    branch: str


@dataclass
class Verdict:
    overlap: bool
    reason: str
    pairs: int = 0  # (branch 0 kernel, branch 1 kernel) pairs that intersect on two streams
    longest_us: float = 0.0  # the longest such intersection
    kernels: tuple[int, int] = (0, 0)
    streams: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())

    def line(self) -> str:
        what = "overlap" if self.overlap else "no overlap"
        return (
            f"{what}: {self.reason} (kernels: branch0 {self.kernels[0]} on streams "
            f"{list(self.streams[0])}, branch1 {self.kernels[1]} on streams {list(self.streams[1])}; "
            f"intersecting pairs {self.pairs}, longest {self.longest_us:.2f} us)"
        )


def _events(trace) -> list[dict]:
    events = trace.get("traceEvents", []) if isinstance(trace, dict) else trace
    return [e for e in events if e.get("ph") == "X" and "ts" in e]


def branch_kernels(trace, labels: dict[str, str]) -> list[Kernel]:
    """Every kernel whose launch lies inside a range named with one of ``labels``'s values
    (the innermost such range wins); ``labels`` maps branch name -> label substring."""
    events = _events(trace)
    ranges: dict[tuple, list[tuple[float, float, str]]] = {}
    for e in events:
        if e.get("cat") != "user_annotation":
            continue
        for branch, label in labels.items():
            if label in e.get("name", ""):
                key = (e.get("pid"), e.get("tid"))
                ranges.setdefault(key, []).append((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), branch))
    for spans in ranges.values():
        spans.sort()
    launches = {}
    for e in events:
        if e.get("cat") in RUNTIME_CATEGORIES and "correlation" in e.get("args", {}):
            launches[e["args"]["correlation"]] = e
    found = []
    for e in events:
        if e.get("cat") not in KERNEL_CATEGORIES:
            continue
        args = e.get("args", {})
        launch = launches.get(args.get("correlation"))
        if launch is None:
            continue
        spans = ranges.get((launch.get("pid"), launch.get("tid")), [])
        t = float(launch["ts"])
        i = bisect.bisect_right(spans, (t, float("inf"), "~"))
        inside = [s for s in spans[:i] if s[0] <= t <= s[1]]
        if not inside:
            continue
        branch = min(inside, key=lambda s: s[1] - s[0])[2]  # the innermost range
        start = float(e["ts"])
        found.append(
            Kernel(e.get("name", "?"), int(args.get("stream", -1)), start, start + float(e.get("dur", 0)), branch)
        )
    return found


def check(trace, label0: str, label1: str) -> Verdict:
    kernels = branch_kernels(trace, {"branch0": label0, "branch1": label1})
    k0 = [k for k in kernels if k.branch == "branch0"]
    k1 = [k for k in kernels if k.branch == "branch1"]
    streams = (tuple(sorted({k.stream for k in k0})), tuple(sorted({k.stream for k in k1})))
    counts = (len(k0), len(k1))
    if not k0 or not k1:
        missing = label0 if not k0 else label1
        return Verdict(False, f"no kernels found for {missing!r}", kernels=counts, streams=streams)
    pairs, longest = 0, 0.0
    for a in k0:
        for b in k1:
            if a.stream == b.stream:
                continue
            inter = min(a.end, b.end) - max(a.start, b.start)
            if inter > 0:
                pairs += 1
                longest = max(longest, inter)
    if pairs:
        return Verdict(True, "kernels of both branches ran at once on two streams", pairs, longest, counts, streams)
    if set(streams[0]) == set(streams[1]) and len(streams[0]) == 1:
        reason = "both branches ran on one stream"
    else:
        reason = "the branches ran on different streams, one after the other"
    return Verdict(False, reason, 0, 0.0, counts, streams)


def load(path: str):
    """A Chrome trace, plain or gzipped (``torch.profiler`` writes either)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        return json.load(fh)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace")
    parser.add_argument("--branch0", required=True, help="label of branch 0's ranges")
    parser.add_argument("--branch1", required=True, help="label of branch 1's ranges")
    args = parser.parse_args(argv)
    verdict = check(load(args.trace), args.branch0, args.branch1)
    print(verdict.line())
    return 0 if verdict.overlap else 1


if __name__ == "__main__":
    sys.exit(main())
