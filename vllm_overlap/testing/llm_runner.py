"""Generate greedily with a tiny model through ``vllm.LLM``, in this process, and print JSON.

    python -m vllm_overlap.testing.llm_runner MODEL_DIR [--compile [--cudagraph-mode MODE]] [--tp 2] [--multiproc]
                                         [--max-tokens 8] [--gpu-memory-utilization 0.2]

The overlay is whatever the environment says (VLLM_OVERLAP, VLLM_OVERLAP_CONFIG): run it
twice with different environments to compare on and off. The last stdout line is JSON with
the token ids, the wall times and this process's vllm-overlap state.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--compile", action="store_true", help="vLLM torch.compile on")
    parser.add_argument(
        "--cudagraph-mode", default=None, help="with --compile: vLLM's cudagraph_mode (CUDA only)"
    )
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.2)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--multiproc", action="store_true", help="engine core in its own process")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--load-format", default="auto")
    args = parser.parse_args()

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if not args.multiproc and args.tp == 1:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if args.tp > 1:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i) for i in range(args.tp)))

    from vllm import LLM, SamplingParams

    from vllm_overlap.testing.tiny_models import prompts

    extra = {}
    if args.cudagraph_mode:
        extra["compilation_config"] = {"cudagraph_mode": args.cudagraph_mode}
    t0 = time.perf_counter()
    llm = LLM(
        model=args.model,
        tokenizer=args.model,
        dtype="bfloat16",
        enforce_eager=not args.compile,
        tensor_parallel_size=args.tp,
        distributed_executor_backend="mp" if args.tp > 1 else "uni",
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_model_len=256,
        max_num_seqs=8,
        seed=0,
        load_format=args.load_format,
        **extra,
    )
    t_init = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    t1 = time.perf_counter()
    outs = llm.generate(prompts(args.prompts), params, use_tqdm=False)
    t_gen = time.perf_counter() - t1

    import glob

    import torch._dynamo.utils as dynamo_utils

    from vllm_overlap import outcomes
    from vllm_overlap.runtime import reports as census
    from vllm_overlap.runtime.plugin import summary_line

    cache_root = os.environ.get("VLLM_CACHE_ROOT", "")
    artefacts = glob.glob(os.path.join(cache_root, "torch_compile_cache", "**", "*.so"), recursive=True)
    stats = dynamo_utils.counters["stats"]
    result = {
        "dynamo_unique_graphs": stats.get("unique_graphs", 0),
        "graph_breaks": sum(dynamo_utils.counters["graph_break"].values()),
        "inductor_artefacts": len(artefacts) if cache_root else None,
        "token_ids": [list(o.outputs[0].token_ids) for o in outs],
        "init_s": round(t_init, 3),
        "generate_s": round(t_gen, 3),
        "summary": summary_line(),
        "post_load": census.post_load_reports,
        "sites": census.site_reports,
        "outcomes": {f"{o.feature}:{o.target}": o.describe() for o in outcomes.outcomes.values()},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
