"""Decode speed through ``vllm.LLM`` at real per-layer shapes, in one process (one overlay setting).

    python gpu/decode.py --kind qwen3-next --layers 4 --out run.json
    python gpu/decode.py --kind qwen3-next --layers 4 --out run.json --smoke   # tiny, anywhere

A published model's config with fewer layers (``gpu/model_configs.reduced``), dummy weights,
no tokenizer (prompts are token ids), torch.compile and vLLM's default CUDA graphs. For each
concurrency ``c``: ``c`` prompts of ``--prompt-len`` tokens generate ``--short`` and then
``--short + --steps`` tokens greedily (ignore_eos); the difference of the two wall times is
``--steps`` decode steps: ``step_ms`` per step and ``tokens_per_s`` = c * steps / that time.
Each is the median of ``--repeats``. The overlay is whatever the environment says: run this
twice (``gpu/suite.py`` runs off, on, off and reports on/off with the off-to-off noise).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", default="qwen3-next", choices=["qwen3-next", "deepseek-v32"])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--short", type=int, default=4)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument("--eager", action="store_true", help="enforce_eager (no compile, no graphs)")
    parser.add_argument("--smoke", action="store_true", help="tiny config and counts (any device)")
    parser.add_argument("--workdir", default=None, help="where the config dir goes")
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args(argv)

    from model_configs import reduced

    workdir = args.workdir or os.path.dirname(os.path.abspath(args.out))
    model_dir = os.path.join(workdir, f"{args.kind}-{args.layers}-layers")
    overrides = {}
    if args.smoke:  # the same architecture at toy size: checks the script, measures nothing
        overrides = _SMOKE[args.kind]
        args.concurrency, args.steps, args.repeats = [1, 2], 4, 1
        model_dir += "-smoke"
    reduced(args.kind, args.layers, model_dir, overrides)
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as fh:
        vocab = json.load(fh)["vocab_size"]

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams

    max_c = max(args.concurrency)
    started = time.perf_counter()
    llm = LLM(
        model=model_dir,
        skip_tokenizer_init=True,
        load_format="dummy",
        dtype="bfloat16",
        enforce_eager=args.eager,
        max_model_len=args.prompt_len + args.short + args.steps + 16,
        max_num_seqs=max_c,
        gpu_memory_utilization=args.gpu_memory_utilization,
        distributed_executor_backend="uni",
        seed=0,
    )
    init_s = time.perf_counter() - started

    def prompts(c: int) -> list[dict]:
        return [
            {"prompt_token_ids": [(17 + 31 * i + 7 * j) % (vocab - 1) + 1 for j in range(args.prompt_len)]}
            for i in range(c)
        ]

    def timed(c: int, max_tokens: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
        t0 = time.perf_counter()
        outs = llm.generate(prompts(c), params, use_tqdm=False)
        elapsed = time.perf_counter() - t0
        assert all(len(o.outputs[0].token_ids) == max_tokens for o in outs)
        return elapsed

    rows = []
    for c in args.concurrency:
        timed(c, args.short + args.steps)  # warm-up at this batch size
        decode = []
        for _ in range(args.repeats):
            decode.append(timed(c, args.short + args.steps) - timed(c, args.short))
        t = statistics.median(decode)
        rows.append(
            {
                "concurrency": c,
                "step_ms": t / args.steps * 1e3,
                "tokens_per_s": c * args.steps / t,
                "spread": (max(decode) - min(decode)) / t,
            }
        )
        print(f"concurrency {c}: {rows[-1]['step_ms']:.3f} ms/step, {rows[-1]['tokens_per_s']:.1f} tok/s", flush=True)

    from vllm_overlap.runtime.plugin import summary_line

    result = {
        "kind": args.kind,
        "layers": args.layers,
        "eager": args.eager,
        "smoke": args.smoke,
        "overlay": os.environ.get("VLLM_OVERLAP", ""),
        "summary": summary_line(),
        "init_s": round(init_s, 1),
        "rows": rows,
    }
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1)
    print(json.dumps(result))
    return 0


# Toy sizes of the same architectures (CPU smoke of this script).
_SMOKE = {
    "qwen3-next": dict(
        hidden_size=128, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4, num_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=64,
        vocab_size=512, max_position_embeddings=512,
    ),
    "deepseek-v32": dict(
        hidden_size=128, intermediate_size=128, moe_intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
        q_lora_rank=64, index_n_heads=4, vocab_size=512, max_position_embeddings=512,
    ),
}


if __name__ == "__main__":
    sys.exit(main())
