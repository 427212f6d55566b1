"""Proof that gdn_in_proj's branches run at the same time: a profiler trace of decode steps.

    python gpu/profile_gdn.py --out DIR [--layers 4] [--concurrency 16]

Runs Qwen3-Next-80B-A3B's config with ``--layers`` layers (dummy weights) in this process
with the overlay on, ``when: always`` and ``enforce_eager`` (eager steps fork like captured ones; their kernels
keep the launch -> kernel correlation the check needs). Each ``in_proj_qkvz`` and
``in_proj_ba`` call runs inside a ``record_function`` range named by its prefix, and a few
decode steps are profiled twice:

* ``gpu_ahead``: each forward first queues ``torch.cuda._sleep`` on the current stream, so the
  CPU enqueues the whole step before the GPU starts it, as a CUDA graph replay does: the
  streams then decide alone what runs at once;
* ``natural``: plain eager steps (the GPU may drain between launches: overlap is possible
  only where a GEMM outlasts the launch of the other).

For each, ``gpu/trace_overlap.py`` gives the verdict; written as ``profile.json`` and the
gzipped traces in ``--out``. Exits 0 when the ``gpu_ahead`` trace shows overlap.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

BRANCHES = ("in_proj_qkvz", "in_proj_ba")


def annotate(model) -> int:
    """Wrap each GDN projection's forward in a record_function range named by its prefix."""
    import torch

    count = 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in BRANCHES:
            inner = module.forward
            label = f"vllm_overlap_branch:{name}"

            def forward(*args, _inner=inner, _label=label, **kwargs):
                with torch.profiler.record_function(_label):
                    return _inner(*args, **kwargs)

            module.forward = forward
            count += 1
    return count


def gpu_ahead(model, cycles: int) -> None:
    """Make every forward of ``model`` first keep the GPU busy for ``cycles`` clock cycles."""
    import torch

    inner = model.forward

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        if GPU_AHEAD["on"]:
            torch.cuda._sleep(cycles)
        return inner(*args, **kwargs)

    model.forward = forward


GPU_AHEAD = {"on": False}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--sleep-cycles", type=int, default=50_000_000, help="~25 ms at 2 GHz")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["VLLM_OVERLAP"] = "1"
    # Eager steps fork only with `when: always` (the default, capture, forks while a CUDA graph
    # is captured; enforce_eager captures none).
    config = os.path.join(args.out, "when-always.yaml")
    with open(config, "w", encoding="utf-8") as fh:
        fh.write("features:\n  gdn_in_proj: {when: always}\n")
    os.environ["VLLM_OVERLAP_CONFIG"] = config

    import torch
    from model_configs import reduced
    from trace_overlap import check, load
    from vllm import LLM, SamplingParams

    model_dir = reduced("qwen3-next", args.layers, os.path.join(args.out, f"qwen3-next-{args.layers}-layers"))
    llm = LLM(
        model=model_dir,
        skip_tokenizer_init=True,
        load_format="dummy",
        dtype="bfloat16",
        enforce_eager=True,
        max_model_len=256,
        max_num_seqs=args.concurrency,
        gpu_memory_utilization=args.gpu_memory_utilization,
        distributed_executor_backend="uni",
        seed=0,
    )
    annotated = sum(llm.apply_model(annotate))
    llm.apply_model(lambda model: gpu_ahead(model, args.sleep_cycles))
    prompts = [{"prompt_token_ids": [(7 * i + j) % 1000 + 1 for j in range(16)]} for i in range(args.concurrency)]
    params = SamplingParams(temperature=0.0, max_tokens=args.steps, ignore_eos=True, detokenize=False)
    llm.generate(prompts, params, use_tqdm=False)  # warm-up

    from vllm_overlap.runtime.plugin import summary_line

    report = {"summary": summary_line(), "annotated_projections": annotated, "traces": {}}
    for name, ahead in (("gpu_ahead", True), ("natural", False)):
        GPU_AHEAD["on"] = ahead
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            llm.generate(prompts, params, use_tqdm=False)
            torch.cuda.synchronize()
        path = os.path.join(args.out, f"trace-{name}.json.gz")
        prof.export_chrome_trace(path)
        verdict = check(load(path), *BRANCHES)
        report["traces"][name] = {"file": os.path.basename(path), "verdict": verdict.line(), "overlap": verdict.overlap}
        print(f"{name}: {verdict.line()}", flush=True)
    with open(os.path.join(args.out, "profile.json"), "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=1)
    return 0 if report["traces"]["gpu_ahead"]["overlap"] else 1


if __name__ == "__main__":
    sys.exit(main())
