"""End to end: vLLM's own serving benchmark against a server with the overlay on, then off.

    python benchmarks/serve.py --model Qwen/Qwen3-Next-80B-A3B-Instruct --tp 4       # a GPU box
    python benchmarks/serve.py --smoke                # CPU: tiny offline model, small numbers

For each setting a fresh OpenAI-compatible server is started (``python -m
vllm.entrypoints.openai.api_server``; ``VLLM_OVERLAP=0`` for off), then vLLM's benchmark
(``vllm.benchmarks.serve``, what ``vllm bench serve`` runs) is driven at each concurrency with
random prompts. Prints output tokens/s, median TTFT and TPOT as a table (last) and saves a PNG
and JSON in --out. CPU numbers only show the harness works: there is no second stream there.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def free_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def launch_server(args: list[str], env: dict, port: int, log_path: str, timeout: float = 600) -> subprocess.Popen:
    """``python -m vllm.entrypoints.openai.api_server --host 127.0.0.1 --port PORT ARGS`` (loopback
    only) in a process group of its own, its output to ``log_path``; returns once ``/health``
    answers 200. Stops the whole group and raises SystemExit if it exits or is not healthy
    within ``timeout`` seconds. Stop it with ``stop_server``."""
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port", str(port)]
    cmd += args
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"server exited with {proc.returncode}; log: {log_path}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        return proc
            except OSError:
                time.sleep(1)
        raise SystemExit(f"server did not become healthy in {timeout:.0f} s; log: {log_path}")
    except BaseException:
        stop_server(proc)
        raise


def stop_server(proc: subprocess.Popen, grace: float = 60) -> None:
    """Stop a ``launch_server`` server and every process in its group (engine core, workers):
    SIGTERM to the server (it shuts its engine down), then SIGKILL to whatever of the group is
    left once it has exited or after ``grace`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def start_server(model: str, port: int, overlay: bool, tp: int, smoke: bool, log_path: str):
    env = dict(os.environ, VLLM_OVERLAP="1" if overlay else "0")
    args = ["--model", model, "--tensor-parallel-size", str(tp), "--seed", "0"]
    if smoke:  # the CPU backend: small memory, no compile (start-up in seconds)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        args += ["--dtype", "bfloat16", "--max-model-len", "256", "--max-num-seqs", "8",
                 "--gpu-memory-utilization", "0.2", "--enforce-eager"]
    return launch_server(args, env, port, log_path)


def run_benchmark(model: str, port: int, concurrency: int, prompts: int, in_len: int, out_len: int) -> dict:
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args([
        "--backend", "vllm", "--base-url", f"http://127.0.0.1:{port}",
        "--model", model, "--tokenizer", model,
        "--dataset-name", "random", "--random-input-len", str(in_len),
        "--random-output-len", str(out_len), "--ignore-eos",
        "--num-prompts", str(prompts), "--max-concurrency", str(concurrency),
        "--seed", "0", "--disable-tqdm",
    ])
    result = main(args)
    return {
        "completed": result["completed"],
        "output_tok_s": result["output_throughput"],
        "ttft_ms": result["median_ttft_ms"],
        "tpot_ms": result["median_tpot_ms"],
    }


def plot(rows: list[dict], title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conc = [r["concurrency"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    for side in ("on", "off"):
        left.plot(conc, [r[f"tok/s {side}"] for r in rows], "o-", label=f"overlay {side}")
        right.plot(conc, [r[f"TPOT ms {side}"] for r in rows], "o-", label=f"overlay {side}")
    left.set_ylabel("output tokens/s")
    right.set_ylabel("median TPOT (ms)")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="HF id or path (default with --smoke: tiny Qwen3-Next)")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--concurrency", default="1,2,4,8")
    parser.add_argument("--prompts-per-concurrency", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=1024)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--smoke", action="store_true", help="CPU smoke run: tiny model, tiny numbers")
    parser.add_argument("--out", default=os.path.join(ROOT, "out", "benchmarks"))
    args = parser.parse_args()

    model = args.model
    if args.smoke:
        args.prompts_per_concurrency, args.input_len, args.output_len = 2, 16, 8
        if model is None:
            from vllm_overlap.testing.tiny_models import build

            cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vllm-overlap")
            model = build("qwen3-next", os.path.join(cache, "tiny-models", "qwen3-next-2"))
    if model is None:
        raise SystemExit("--model is required (or --smoke)")
    levels = [int(c) for c in args.concurrency.split(",")]
    os.makedirs(args.out, exist_ok=True)

    results: dict[str, dict[int, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="vllm-overlap-serve-") as logs:
        for side, overlay in (("on", True), ("off", False)):
            port = free_port()
            log_path = os.path.join(logs, f"server-{side}.log")
            server = start_server(model, port, overlay, args.tp, args.smoke, log_path)
            try:
                results[side] = {
                    c: run_benchmark(model, port, c, args.prompts_per_concurrency * c, args.input_len, args.output_len)
                    for c in levels
                }
            finally:
                stop_server(server)
            applied = "gdn_in_proj applied" in open(log_path).read()
            print(f"server overlay {side}: vllm-overlap line says applied = {applied}")

    rows = []
    for c in levels:
        on, off = results["on"][c], results["off"][c]
        rows.append({
            "concurrency": c,
            "tok/s on": round(on["output_tok_s"], 2),
            "tok/s off": round(off["output_tok_s"], 2),
            "on/off": round(on["output_tok_s"] / off["output_tok_s"], 3),
            "TTFT ms on": round(on["ttft_ms"], 2),
            "TTFT ms off": round(off["ttft_ms"], 2),
            "TPOT ms on": round(on["tpot_ms"], 2),
            "TPOT ms off": round(off["tpot_ms"], 2),
            "done": f"{on['completed']}/{off['completed']}",
        })
    device = "gpu" if not args.smoke else "cpu-smoke"
    stem = os.path.join(args.out, f"serve-{device}")
    title = f"{os.path.basename(model.rstrip('/'))}, TP {args.tp}, in {args.input_len} / out {args.output_len} tokens"
    with open(stem + ".json", "w") as fh:
        json.dump({"model": model, "tp": args.tp, "rows": rows}, fh, indent=1)
    plot(rows, title, stem + ".png")
    print(f"saved {stem}.png and {stem}.json")

    from vllm_overlap.cli.tables import format_table

    print(f"\nvllm-overlap serve benchmark: {title} (medians)")
    print(format_table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
