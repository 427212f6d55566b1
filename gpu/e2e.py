"""End to end through ``vllm.LLM``: overlay on vs off must give identical greedy token ids.

    python gpu/e2e.py --out DIR                # on a GPU: eager, compiled + piecewise graphs,
                                               # compiled + FULL graphs (FULL_AND_PIECEWISE,
                                               # FULL_DECODE_ONLY)
    python gpu/e2e.py --out DIR --smoke        # anywhere: eager and compiled (the CPU has no graphs)

Each run is ``python -m vllm_overlap.testing.llm_runner`` in a fresh process (the overlay is decided when vLLM loads
the plugin), on a tiny random-weight Qwen3-Next (``gpu/model_configs.tiny``: attention
head_dim 128 for the CUDA kernels). On and off of one mode run side by side (``--jobs``
processes at a time, each with a small ``gpu_memory_utilization``). A mode passes when both
runs finished, the on-run's process applied ``gdn_in_proj`` (its own state line) and the
token ids are identical. Writes ``e2e.json`` in ``--out``; prints a table last; exits 1 if a
mode did not pass.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RUNNER = ["-m", "vllm_overlap.testing.llm_runner"]

MODES = {
    "eager": [],
    "compiled_piecewise": ["--compile", "--cudagraph-mode", "PIECEWISE"],
    "compiled_full_and_piecewise": ["--compile", "--cudagraph-mode", "FULL_AND_PIECEWISE"],
    "compiled_full_decode_only": ["--compile", "--cudagraph-mode", "FULL_DECODE_ONLY"],
}
SMOKE_MODES = {"eager": [], "compiled": ["--compile"]}
SWITCH = {"on": {"VLLM_OVERLAP": "1"}, "off": {"VLLM_OVERLAP": "0"}}
APPLIED = "gdn_in_proj applied (4/4 targets)"


def run_one(model: str, flags: list[str], switch: str, log_dir: str, cache: str, timeout: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_OVERLAP")}
    env.update(SWITCH[switch], VLLM_CACHE_ROOT=cache, PYTHONUNBUFFERED="1")
    started = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, *RUNNER, model, *flags],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out, err = "timeout", exc.stdout or "", exc.stderr or ""
        out, err = (x.decode() if isinstance(x, bytes) else x for x in (out, err))
    with open(os.path.join(log_dir, f"{switch}.log"), "w", encoding="utf-8") as fh:
        fh.write(out + "\n--- stderr ---\n" + err)
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    result = json.loads(lines[-1]) if rc == 0 and lines else {}
    return {"rc": rc, "seconds": round(time.perf_counter() - started, 1), **result}


def compare(mode: str, on: dict, off: dict) -> dict:
    row = {"mode": mode, "on_rc": on["rc"], "off_rc": off["rc"], "on_s": on["seconds"], "off_s": off["seconds"]}
    if on["rc"] != 0 or off["rc"] != 0:
        row["verdict"] = "FAILED: a run did not finish (see its log)"
        return row
    applied = APPLIED in on.get("summary", "")
    identical = on["token_ids"] == off["token_ids"]
    row.update(
        applied=applied,
        identical=identical,
        sequences=len(on["token_ids"]),
        tokens=sum(len(t) for t in on["token_ids"]),
        verdict="pass"
        if applied and identical
        else ("FAILED: token ids differ" if not identical else "FAILED: overlay not applied in the on-run"),
    )
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--modes", nargs="+", default=None)
    parser.add_argument("--smoke", action="store_true", help="CPU: eager and compiled only")
    parser.add_argument("--model", default=None, help="a checkpoint dir (default: build the tiny one)")
    parser.add_argument("--jobs", type=int, default=4, help="runs at a time")
    parser.add_argument("--timeout", type=int, default=420, help="seconds per run")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.1)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=8)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    table = SMOKE_MODES if args.smoke else MODES
    modes = args.modes or list(table)
    unknown = [m for m in modes if m not in table]
    if unknown:
        parser.error(f"unknown mode(s) {unknown}; known: {list(table)}")

    if args.model:
        model = args.model
    elif args.smoke:
        from vllm_overlap.testing import tiny_models

        model = tiny_models.build("qwen3-next", os.path.join(args.out, "tiny-qwen3-next"))
    else:
        sys.path.insert(0, HERE)
        from model_configs import tiny

        model = tiny("qwen3-next", os.path.join(args.out, "tiny-qwen3-next-hd128"))
    common = [
        "--max-tokens",
        str(args.max_tokens),
        "--prompts",
        str(args.prompts),
        "--gpu-memory-utilization",
        str(args.gpu_memory_utilization),
    ]
    jobs = []
    for mode in modes:
        for switch in ("on", "off"):
            log_dir = os.path.join(args.out, mode)
            os.makedirs(log_dir, exist_ok=True)
            cache = os.path.join(args.out, "vllm-cache", mode, switch)
            jobs.append((mode, switch, [model, table[mode] + common, switch, log_dir, cache, args.timeout]))
    print(f"e2e: {len(modes)} modes x on/off on {model}, {args.jobs} at a time", flush=True)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {(mode, switch): pool.submit(run_one, *a) for mode, switch, a in jobs}
    results = {key: f.result() for key, f in futures.items()}
    rows = [compare(mode, results[mode, "on"], results[mode, "off"]) for mode in modes]
    with open(os.path.join(args.out, "e2e.json"), "w", encoding="utf-8") as fh:
        json.dump(
            {"model": model, "rows": rows, "runs": {f"{m}:{s}": r for (m, s), r in results.items()}}, fh, indent=1
        )
    columns = ["mode", "verdict", "applied", "identical", "sequences", "tokens", "on_s", "off_s"]
    widths = {c: max(len(c), *(len(str(r.get(c, "-"))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(str(r.get(c, "-")).ljust(widths[c]) for c in columns).rstrip())
    return 0 if all(r["verdict"] == "pass" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
