"""Per-layer latency of each site's overlapped region, overlay on vs off, across token counts.

    python benchmarks/site_regions.py                      # CPU smoke: tiny Qwen3-Next, serial path
    python benchmarks/site_regions.py --model Qwen/Qwen3-Next-80B-A3B-Instruct --tp 4   # on a GPU
    python benchmarks/site_regions.py --model deepseek-ai/DeepSeek-V3.2 --tp 8          # on a GPU

Every site the model's layers run is timed on its real vLLM layer (``vllm_overlap.testing.layer_builders``);
a site that cannot be timed outside the engine is listed with the reason.

On a GPU every region is captured in a CUDA graph and timed with device events over replays:
``on/off`` below 1 is a speed-up, and ``bound`` (critical path / serial sum of the two
branches, each timed alone) is the best ratio perfect overlap could reach. On the CPU there is
no aux stream, so the rewritten code runs the upstream statements: ``on/off`` is the overlay's
overhead as deployed, to be read against ``noise`` (the overlay-off region's spread over
interleaved rounds); ``op_path/off`` is the op path a GPU takes, run serially: the Python cost
an eager (``--enforce-eager``) run pays per call. Prints the table last and saves a PNG and JSON in --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def plot(rows: list[dict], title: str, path: str, gpu: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = [r["tokens"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(tokens, [r["on/off"] for r in rows], "o-", label="overlay on / off")
    if gpu:
        ax.plot(tokens, [r["bound"] for r in rows], "s--", label="bound: critical path / serial sum")
    else:
        ax.fill_between(
            tokens,
            [1 - r["noise"] for r in rows],
            [1 + r["noise"] for r in rows],
            alpha=0.2,
            label="run-to-run noise (off vs off)",
        )
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens in the batch")
    ax.set_ylabel("latency ratio (lower is faster)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(rows: list[dict], gpu: bool) -> str:
    from vllm_overlap.cli.tables import format_table

    cols = ["tokens", "off_us", "on_us", "on/off"]
    cols += ["serial_sum_us", "critical_path_us", "bound"] if gpu else ["noise", "op_path/off"]
    shown = [
        {c: (f"{r[c]:.3f}" if isinstance(r[c], float) else r[c]) for c in cols} for r in rows
    ]
    return format_table(shown, cols)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="HF id or path (default: a tiny offline Qwen3-Next)")
    parser.add_argument("--tp", type=int, default=1, help="per-rank shapes of this TP size")
    parser.add_argument("--hf-overrides", default=None, help="JSON, as vLLM's --hf-overrides")
    parser.add_argument("--tokens", default=",".join(map(str, (1, 2, 4, 8, 16, 64, 256, 1024, 4096))))
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--out", default=os.path.join(ROOT, "out", "benchmarks"))
    args = parser.parse_args()

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = args.model
    if model is None:
        from vllm_overlap.testing.tiny_models import build

        cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vllm-overlap")
        model = build("qwen3-next", os.path.join(cache, "tiny-models", "qwen3-next-2"))
    token_counts = [int(t) for t in args.tokens.split(",")]
    overrides = json.loads(args.hf_overrides) if args.hf_overrides else None
    from vllm_overlap.testing.layer_bench import measure_model

    results, where = measure_model(model, args.tp, token_counts, args.reps, device, overrides)
    if not results:
        sys.exit(f"no site of vllm-overlap runs in {model}'s layers")
    os.makedirs(args.out, exist_ok=True)
    name = os.path.basename(model.rstrip("/"))
    for site_id, rows in results.items():
        if isinstance(rows, str):
            print(f"{site_id}: not measured: {rows}")
            continue
        stem = os.path.join(args.out, f"layers-{site_id}-{device}")
        title = f"{site_id} region on {where}: {name}, TP {args.tp}"
        with open(stem + ".json", "w") as fh:
            json.dump({"where": where, "model": model, "tp": args.tp, "site": site_id, "rows": rows}, fh, indent=1)
        plot(rows, title, stem + ".png", device == "cuda")
        print(f"saved {stem}.png and {stem}.json")
        if device == "cpu":
            above = [r for r in rows if abs(r["on/off"] - 1) > r["noise"]]
            print(
                f"CPU: overlay on/off {min(r['on/off'] for r in rows):.3f}..{max(r['on/off'] for r in rows):.3f}, "
                f"off-vs-off noise up to {max(r['noise'] for r in rows):.3f}: "
                + (
                    "within noise at every token count (|on/off - 1| <= noise)"
                    if not above
                    else "ABOVE noise at " + ", ".join(f"{r['tokens']} tokens" for r in above)
                )
            )
    for site_id, rows in results.items():  # the tables last
        if not isinstance(rows, str):
            print(f"\n{site_id} region on {where}: {name}, TP {args.tp} (median of {args.reps}; times in microseconds)")
            print(table(rows, device == "cuda"))


if __name__ == "__main__":
    main()
