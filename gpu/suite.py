"""The GPU proof, in order of value: each step its own process with its own time limit.

    python gpu/suite.py --out DIR                    # every step, on any CUDA machine with vLLM
    python gpu/suite.py --out DIR --tier 1           # the steps that need torch only (no vLLM)
    python gpu/suite.py --out DIR pairs e2e          # some steps
    python gpu/suite.py --out DIR --dry-run          # list the steps, check their inputs, run nothing

Tier 1 needs the image's torch only: ``pairs`` (benchmarks/pairs.py: serial / dual-stream /
fused GEMMs of every site at real shapes, CUDA-graph replays timed with events),
``trace_primitive`` (gpu/trace_primitive.py: a profiler trace of the fork/join at two shapes,
checked by gpu/trace_overlap.py), ``cuda_tests_torch`` (the tests marked cuda that need no
vLLM: the real fork/join and graph capture of ``runtime/streams.py``). Tier 2 needs the
installed vLLM: ``e2e`` (tiny Qwen3-Next through vllm.LLM: identical greedy token ids overlay
on vs off, eager and compiled with FULL and piecewise CUDA graphs) and ``decode_qwen3_next``
(decode speed off, on, off again at real per-layer shapes). Tier 3, when a session has the
time: ``cuda_tests`` (the tests marked cuda that need vLLM), ``profile`` (a profiler trace of
vLLM decode steps) and ``decode_deepseek_v32``. A step that fails or runs out of time does not
stop the others. Everything goes under ``--out``: a folder per step with its log and results,
``suite.json``, and the summary table printed last. ``gpu/plan.py`` groups the steps into
device calls that fit one session's device time.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PY = sys.executable


@dataclass(frozen=True)
class Step:
    name: str
    what: str
    limit_s: int
    files: tuple[str, ...]  # inputs, relative to the repository root
    modules: tuple[str, ...] = ("torch",)
    commands: tuple = field(default=())  # (label, argv, extra env) per process, run in turn
    tier: int = 3  # 1: torch only; 2: the installed vLLM, first; 3: when there is time


def decode_step(name: str, kind: str, limit_s: int, tier: int = 3, extra: tuple[str, ...] = ()) -> Step:
    runs = []
    for label, switch in (("off", "0"), ("on", "1"), ("off_again", "0")):
        argv = [PY, "gpu/decode.py", "--kind", kind, "--layers", "{layers}", *extra, "--out", f"{{dir}}/{label}.json"]
        runs.append((label, argv, {"VLLM_OVERLAP": switch}))
    return Step(
        name,
        f"decode tokens/s and step time, overlay off / on / off, {kind} config with few layers",
        limit_s,
        ("gpu/decode.py", "gpu/model_configs.py"),
        ("torch", "vllm", "vllm_overlap"),
        tuple(runs),
        tier,
    )


# Tier 1's pair benchmark: every site at its first published model, tp 1 and 8 (the widest and
# the narrowest per-rank GEMMs), bf16 then FP8, token counts from decode to prefill chunks.
PAIRS_TIER1 = (
    "--models",
    "Qwen3-Next-80B-A3B",
    "DeepSeek-V3.2",
    "MiniCPM3-4B",
    "OLMo-Hybrid-7B",
    "Ling-3.0-flash",
    "Kimi-Linear-48B-A3B",
    "--tp",
    "1",
    "8",
    "--dtypes",
    "bf16",
    "fp8",
    "--tokens",
    "1",
    "16",
    "64",
    "256",
    "1024",
    "--rounds",
    "3",
    "--budget-ms",
    "5",
)
CUDA_TESTS_TORCH = ("tests/test_streams.py",)  # the cuda-marked tests that need no vLLM
CUDA_TESTS_VLLM = ("tests/test_deepseek_cuda.py", "tests/test_sites_cuda.py")
PYTEST = (PY, "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider")

STEPS = {
    s.name: s
    for s in (
        Step(
            "pairs",
            "serial vs dual-stream (aux first) vs fused GEMMs of every site at real shapes (CUDA graphs)",
            50,
            ("benchmarks/pairs.py", "benchmarks/model_shapes.py", "vllm_overlap/runtime/streams.py"),
            ("torch",),
            (("pairs", [PY, "benchmarks/pairs.py", *PAIRS_TIER1, "--out", "{dir}"], {}),),
            1,
        ),
        Step(
            "trace_primitive",
            "profiler trace of the fork/join at two shapes: both branches' kernels on two streams at once?",
            15,
            (
                "gpu/trace_primitive.py",
                "gpu/trace_overlap.py",
                "benchmarks/pairs.py",
                "vllm_overlap/runtime/streams.py",
            ),
            ("torch",),
            (("trace", [PY, "gpu/trace_primitive.py", "--out", "{dir}"], {}),),
            1,
        ),
        Step(
            "cuda_tests_torch",
            "the tests marked cuda that need no vLLM (the real fork/join, fan-out, graph capture)",
            20,
            ("tests/conftest.py", *CUDA_TESTS_TORCH),
            ("torch", "pytest", "yaml", "pydantic"),
            (("pytest", [*PYTEST, *CUDA_TESTS_TORCH], {}),),
            1,
        ),
        Step(
            "e2e",
            "tiny Qwen3-Next through vllm.LLM, on vs off: eager, and compiled with FULL and piecewise graphs",
            100,
            (
                "gpu/e2e.py",
                "vllm_overlap/testing/llm_runner.py",
                "vllm_overlap/testing/tiny_models.py",
                "gpu/model_configs.py",
            ),
            ("torch", "vllm", "vllm_overlap", "transformers"),
            (
                (
                    "e2e",
                    [
                        PY,
                        "gpu/e2e.py",
                        "--out",
                        "{dir}",
                        "--modes",
                        "eager",
                        "compiled_full_and_piecewise",
                        "--timeout",
                        "90",
                    ],
                    {},
                ),
            ),
            2,
        ),
        decode_step(
            "decode_qwen3_next", "qwen3-next", 125, 2, ("--concurrency", "1", "16", "--steps", "32", "--repeats", "3")
        ),
        Step(
            "cuda_tests",
            "the tests marked cuda that need vLLM",
            150,
            ("tests/conftest.py", *CUDA_TESTS_VLLM),
            ("torch", "vllm", "vllm_overlap", "pytest"),
            (("pytest", [*PYTEST, *CUDA_TESTS_VLLM], {}),),
        ),
        Step(
            "profile",
            "profiler trace of decode steps, overlay on: gdn_in_proj branches on two streams at once?",
            180,
            ("gpu/profile_gdn.py", "gpu/trace_overlap.py", "gpu/model_configs.py"),
            ("torch", "vllm", "vllm_overlap"),
            (("profile", [PY, "gpu/profile_gdn.py", "--out", "{dir}"], {}),),
        ),
        decode_step("decode_deepseek_v32", "deepseek-v32", 420),
    )
}
TIERS = {t: tuple(name for name, s in STEPS.items() if s.tier == t) for t in (1, 2, 3)}
DEFAULT_LAYERS = {"decode_qwen3_next": 4, "decode_deepseek_v32": 3}


def missing_inputs(step: Step) -> list[str]:
    """What a step needs and this machine lacks (files of the repository, Python modules)."""
    gone = [f for f in step.files if not os.path.exists(os.path.join(ROOT, f))]
    gone += [f"python module {m}" for m in step.modules if importlib.util.find_spec(m) is None]
    return gone


def expand(argv: list[str], directory: str, layers: int) -> list[str]:
    return [a.format(dir=directory, layers=layers) for a in argv]


def run_step(step: Step, out: str, layers: int) -> dict:
    directory = os.path.join(out, step.name)
    os.makedirs(directory, exist_ok=True)
    started = time.perf_counter()
    results = []
    for label, argv, env_extra in step.commands:
        left = step.limit_s - (time.perf_counter() - started)
        if left <= 0:
            results.append({"run": label, "rc": "not started: step out of time"})
            continue
        env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_OVERLAP")}
        env.update(env_extra, PYTHONUNBUFFERED="1")
        log_path = os.path.join(directory, f"{label}.log")
        t0 = time.perf_counter()
        with open(log_path, "w", encoding="utf-8") as log:
            try:
                rc = subprocess.run(
                    expand(argv, directory, layers),
                    cwd=ROOT,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    timeout=left,
                ).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        results.append(
            {
                "run": label,
                "rc": rc,
                "seconds": round(time.perf_counter() - t0, 1),
                "log": os.path.relpath(log_path, out),
            }
        )
        print(f"  {step.name}/{label}: rc {rc} in {results[-1]['seconds']}s", flush=True)
    record = {
        "step": step.name,
        "what": step.what,
        "seconds": round(time.perf_counter() - started, 1),
        "runs": results,
        "ok": all(r["rc"] == 0 for r in results),
    }
    if step.name.startswith("decode_"):
        record["decode"] = decode_ratios(directory)
    return record


def decode_ratios(directory: str) -> list[dict] | None:
    """Per concurrency: tokens/s off, on, off again; on/off against the mean off, and the
    noise |off - off again| / mean off."""
    runs = {}
    for label in ("off", "on", "off_again"):
        path = os.path.join(directory, f"{label}.json")
        if not os.path.exists(path):
            return None
        with open(path, encoding="utf-8") as fh:
            runs[label] = {r["concurrency"]: r for r in json.load(fh)["rows"]}
    rows = []
    for c in sorted(runs["on"]):
        off = [runs["off"][c]["tokens_per_s"], runs["off_again"][c]["tokens_per_s"]]
        mean_off = statistics.mean(off)
        rows.append(
            {
                "concurrency": c,
                "off_tok_s": round(off[0], 1),
                "on_tok_s": round(runs["on"][c]["tokens_per_s"], 1),
                "off_again_tok_s": round(off[1], 1),
                "on/off": round(runs["on"][c]["tokens_per_s"] / mean_off, 4),
                "noise": round(abs(off[0] - off[1]) / mean_off, 4),
                "on_step_ms": round(runs["on"][c]["step_ms"], 3),
                "off_step_ms": round(statistics.mean([runs["off"][c]["step_ms"], runs["off_again"][c]["step_ms"]]), 3),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("steps", nargs="*", help=f"default: all of {list(STEPS)}")
    parser.add_argument("--tier", type=int, choices=sorted(TIERS), default=None, help="the steps of one tier")
    parser.add_argument("--out", default=os.path.join(ROOT, "out", "gpu-suite"))
    parser.add_argument("--dry-run", action="store_true", help="list the steps and check their inputs")
    parser.add_argument("--list", action="store_true", help="list the steps")
    parser.add_argument("--layers", type=int, default=None, help="decode steps: model layers")
    args = parser.parse_args(argv)
    unknown = [s for s in args.steps if s not in STEPS]
    if unknown:
        parser.error(f"unknown step(s) {unknown}; known: {list(STEPS)}")
    if args.tier and args.steps:
        parser.error("give steps or --tier, not both")
    steps = [STEPS[s] for s in (args.steps or (TIERS[args.tier] if args.tier else STEPS))]

    if args.list or args.dry_run:
        problems = 0
        for step in steps:
            missing = missing_inputs(step) if args.dry_run else []
            problems += bool(missing)
            state = ("MISSING " + ", ".join(missing)) if missing else ("inputs found" if args.dry_run else "")
            print(f"{step.name:22s} limit {step.limit_s:4d}s  {step.what}  {state}".rstrip())
            for label, cmd, env in step.commands:
                layers = args.layers or DEFAULT_LAYERS.get(step.name, 0)
                shown = " ".join(expand(cmd, os.path.join(args.out, step.name), layers))
                env_text = " ".join(f"{k}={v}" for k, v in env.items())
                print(f"    {label}: {env_text + ' ' if env_text else ''}{shown}")
        return 1 if problems else 0

    os.makedirs(args.out, exist_ok=True)
    records = []
    for step in steps:
        missing = missing_inputs(step)
        if missing:
            records.append(
                {"step": step.name, "what": step.what, "ok": False, "skipped": f"missing {', '.join(missing)}"}
            )
            print(f"{step.name}: skipped, missing {', '.join(missing)}", flush=True)
            continue
        print(f"{step.name}: {step.what} (limit {step.limit_s}s)", flush=True)
        records.append(run_step(step, args.out, args.layers or DEFAULT_LAYERS.get(step.name, 0)))
        with open(os.path.join(args.out, "suite.json"), "w", encoding="utf-8") as fh:
            json.dump(records, fh, indent=1)
    print()
    for r in records:
        print(f"{r['step']:22s} {'ok' if r['ok'] else 'FAILED'}  {r.get('skipped') or str(r.get('seconds', '')) + 's'}")
        for row in r.get("decode") or []:
            print("    " + "  ".join(f"{k} {v}" for k, v in row.items()))
    return 0 if all(r["ok"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
