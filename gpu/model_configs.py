"""Checkpoint directories (config.json only, or tiny random weights) for the GPU suite.

* ``reduced(kind, layers, out)``: a published model's ``config.json`` with fewer layers, for
  ``load_format="dummy"`` runs at real per-layer shapes (decode speed, the profiler trace).
  The values are those of the model's Hugging Face ``config.json``; the ones that decide the
  overlap sites' shapes are checked against ``benchmarks/model_shapes.MODELS`` by a test.
* ``tiny(kind, out)``: a tiny random-weight Qwen3-Next with a tokenizer (vllm_overlap.testing.tiny_models),
  sized for CUDA kernels (attention head_dim 128, which FlashAttention-3 on Hopper takes).
"""

from __future__ import annotations

import json
import os

QWEN3_NEXT_80B_A3B = {  # Qwen/Qwen3-Next-80B-A3B-Instruct
    "architectures": ["Qwen3NextForCausalLM"],
    "model_type": "qwen3_next",
    "hidden_size": 2048,
    "intermediate_size": 5120,
    "num_hidden_layers": 48,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "head_dim": 256,
    "linear_num_key_heads": 16,
    "linear_num_value_heads": 32,
    "linear_key_head_dim": 128,
    "linear_value_head_dim": 128,
    "linear_conv_kernel_dim": 4,
    "num_experts": 512,
    "num_experts_per_tok": 10,
    "moe_intermediate_size": 512,
    "shared_expert_intermediate_size": 512,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "norm_topk_prob": True,
    "full_attention_interval": 4,
    "partial_rotary_factor": 0.25,
    "rope_theta": 10000000,
    "max_position_embeddings": 262144,
    "rms_norm_eps": 1e-06,
    "vocab_size": 151936,
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}

DEEPSEEK_V32 = {  # deepseek-ai/DeepSeek-V3.2 (FP8 quantization_config left out: dummy bf16)
    "architectures": ["DeepseekV32ForCausalLM"],
    "model_type": "deepseek_v32",
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "num_experts_per_tok": 8,
    "n_group": 8,
    "topk_group": 4,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "norm_topk_prob": True,
    "first_k_dense_replace": 3,
    "moe_layer_freq": 1,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "index_n_heads": 64,
    "index_head_dim": 128,
    "index_topk": 2048,
    "vocab_size": 129280,
    "max_position_embeddings": 163840,
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000,
    "rope_scaling": {
        "type": "yarn",
        "factor": 40,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 0,
    "eos_token_id": 1,
}

PUBLISHED = {"qwen3-next": QWEN3_NEXT_80B_A3B, "deepseek-v32": DEEPSEEK_V32}


def reduced_config(kind: str, layers: int) -> dict:
    """``kind``'s published config with ``layers`` layers (Qwen3-Next: the last of each four
    full attention, as published; DeepSeek-V3.2: the first three dense, as published)."""
    config = json.loads(json.dumps(PUBLISHED[kind]))
    config["num_hidden_layers"] = layers
    if kind == "qwen3-next":
        interval = config["full_attention_interval"]
        config["layer_types"] = [
            "full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(layers)
        ]
    return config


def reduced(kind: str, layers: int, out: str, overrides: dict | None = None) -> str:
    """A checkpoint directory holding only config.json: run it with load_format="dummy" and
    skip_tokenizer_init=True (prompts as token ids). ``overrides``: values to replace."""
    config = reduced_config(kind, layers)
    config.update(overrides or {})
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=1)
    return out


def tiny(kind: str, out: str) -> str:
    """A tiny random-weight model with a tokenizer, sized for CUDA attention kernels."""
    from vllm_overlap.testing import tiny_models

    if kind != "qwen3-next":
        raise ValueError(f"no tiny {kind}")
    return tiny_models.build("qwen3-next", out, gdn_layers=3, head_dim=128)
