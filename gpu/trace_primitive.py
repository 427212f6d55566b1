"""The stream primitive under the profiler: do a site's two branches run at once on two streams?

    python3 gpu/trace_primitive.py --out DIR      # on a CUDA GPU; torch only (no vLLM)

Takes gdn_in_proj's GEMMs at Qwen3-Next-80B-A3B's real per-rank shapes (``benchmarks/model_shapes``,
tp 1, bf16) at two token counts (``--tokens``), and runs the project's own
``vllm_overlap.runtime.streams.fork_join`` on a real second stream, aux branch first, each
branch inside a ``record_function`` range named by its label. Before each fork the current
stream is kept busy (``torch.cuda._sleep``), so the CPU enqueues both branches before the GPU
starts them, as a CUDA-graph replay does: the streams alone decide what runs at once. Per
shape, ``gpu/trace_overlap.py`` reads the trace (``trace-<tokens>.json.gz``) and must find both
branches' kernels on two streams with intersecting intervals; the fork/join outputs must equal
the serial ones bit for bit. Writes ``primitive.json``; exits 0 when every shape passes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, ROOT)

LABELS = ("vllm_overlap_branch:branch0", "vllm_overlap_branch:branch1")
SITE, MODEL, TP = "gdn_in_proj", "Qwen3-Next-80B-A3B", 1


def labelled(fn, label: str):
    """``fn`` run inside a profiler range named ``label`` (the check finds kernels by it)."""
    import torch

    def run():
        with torch.profiler.record_function(label):
            return fn()

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokens", nargs=2, type=int, default=[8, 256], help="the two shapes' token counts")
    parser.add_argument("--forks", type=int, default=8, help="profiled forks per shape")
    parser.add_argument("--sleep-cycles", type=int, default=2_000_000, help="~1 ms at 2 GHz before each fork")
    args = parser.parse_args(argv)

    import torch
    from model_shapes import site_shapes
    from pairs import Pair
    from trace_overlap import check, load

    from vllm_overlap.runtime.streams import fork_join

    if not torch.cuda.is_available():
        print("trace_primitive: needs a CUDA GPU", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    device = torch.device("cuda")
    pair = Pair(site_shapes(SITE, MODEL, TP), "bf16", device)
    report = {"site": SITE, "model": MODEL, "tp": TP, "dtype": "bf16", "gpu": torch.cuda.get_device_name(),
              "shapes": []}
    ok = True
    for tokens in args.tokens:
        x = pair.inputs(tokens)
        b0 = labelled(lambda x=x: pair.b0(x[pair.shapes.branch0.input]), LABELS[0])
        b1 = labelled(lambda x=x: pair.b1(x[pair.shapes.branch1.input]), LABELS[1])
        serial = [*b0(), *b1()]
        for _ in range(2):  # warm-up outside the profile: cuBLAS handles, events
            fork_join(f"trace:{tokens}", b0, b1, pair.aux)
        torch.cuda.synchronize()
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        equal = True
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(args.forks):
                torch.cuda._sleep(args.sleep_cycles)
                r0, r1 = fork_join(f"trace:{tokens}", b0, b1, pair.aux)
                torch.cuda.synchronize()
                equal = equal and all(torch.equal(a, b) for a, b in zip([*r0, *r1], serial))
        path = os.path.join(args.out, f"trace-{tokens}.json.gz")
        prof.export_chrome_trace(path)
        verdict = check(load(path), *LABELS)
        passed = verdict.overlap and equal
        ok = ok and passed
        report["shapes"].append(
            {"tokens": tokens, "trace": os.path.basename(path), "overlap": verdict.overlap,
             "verdict": verdict.line(), "equal_to_serial": equal, "pass": passed}
        )
        print(f"{SITE} {MODEL} tp={TP} bf16 at {tokens} tokens: {verdict.line()}; "
              f"outputs equal to serial: {equal}", flush=True)
    with open(os.path.join(args.out, "primitive.json"), "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
