"""kv_a_proj: an MLA-style attention's kv_a_proj_with_mqa beside its q path (MiniCPM3's low-rank
q path, Kimi-Linear's full-rank q_proj)."""

from __future__ import annotations

from vllm_overlap.engine.rewrite import Anchor, Target
from vllm_overlap.engine.settings import FeatureConfig
from vllm_overlap.engine.site import Branch, Facts, Feature, Form, Output, Site, text_config

MINICPM3_MODULE = "vllm.model_executor.models.minicpm3"

# MiniCPM3Attention.forward (the same lines in every release from 0.20.0 to 0.33.0): the q
# low-rank path, its head view and rope split, then the kv latent projection. The view and the
# split read only q, so the kv projection can start with the q path; they stay after both.
MINICPM3_Q_AND_KV_A = Anchor(
    find="""
        q, _ = self.q_a_proj(hidden_states)
        q = self.q_a_layernorm(q)
        q, _ = self.q_b_proj(q)
        q = q.view(-1, self.num_local_heads, self.qk_head_dim)
        _, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        latent_cache, _ = self.kv_a_proj_with_mqa(hidden_states)
    """,
    replace="""
        q, latent_cache = __site__.q_beside_kv_a(self, hidden_states)
        q = q.view(-1, self.num_local_heads, self.qk_head_dim)
        _, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
    """,
)


def needs_kv_lora(hf_config) -> str | None:
    if not getattr(text_config(hf_config), "kv_lora_rank", None):
        return "no low-rank kv projection (no kv_lora_rank in its config)"
    return None


MINICPM3 = Site(
    id="kv_a_proj_minicpm3",
    feature="kv_a_proj",
    summary="MiniCPM3: q_a_proj -> q_a_layernorm -> q_b_proj beside kv_a_proj_with_mqa, as a custom op",
    targets=(Target(MINICPM3_MODULE, "MiniCPM3Attention.forward"),),
    forms=(
        Form(
            (MINICPM3_Q_AND_KV_A,),
            current=Branch(
                """
                q, _ = self.q_a_proj(hidden_states)
                q = self.q_a_layernorm(q)
                q, _ = self.q_b_proj(q)
                """,
                returns="q",
            ),
            aux=Branch("latent_cache, _ = self.kv_a_proj_with_mqa(hidden_states)", returns="latent_cache"),
        ),
    ),
    entry="q_beside_kv_a",
    params=("self", "hidden_states"),
    tokens="hidden_states",
    dynamo="op",
    op_name="kv_a_proj_minicpm3",
    outputs=(
        Output("q", like="hidden_states", width="self.q_b_proj"),
        Output("latent_cache", like="hidden_states", width="self.kv_a_proj_with_mqa"),
    ),
    # MiniCPM3Attention is not in vLLM's forward context (its Attention child is, under
    # "<prefix>.attn"): every instance registers under its own prefix, the child's minus ".attn".
    registry=True,
    layer_name_expr="self.attn.layer_name.removesuffix('.attn')",
    facts=Facts(
        why=(
            "MiniCPM3's attention runs its q low-rank path (q_a_proj, RMSNorm, q_b_proj) and the "
            "kv latent projection kv_a_proj_with_mqa back to back on one stream, though both "
            "read only the layer's input; at decode each is a skinny GEMM (4B: 2560 -> 768 -> "
            "3840 beside 2560 -> 288) that leaves most of the GPU idle."
        ),
        how=(
            "MiniCPM3's model is traced by torch.compile: the q path and kv_a_proj_with_mqa "
            "become torch.ops.vllm_overlap.kv_a_proj_minicpm3 (exact fake kernel from the "
            "per-rank widths of q_b_proj and kv_a_proj_with_mqa, layer passed as LayerName and "
            "found in the overlay's registry), which forks kv_a_proj_with_mqa onto vLLM's aux "
            "stream within the token range; the head view and rope split of q follow the join, "
            "as upstream has them after both. Serial without an aux stream, outside the range, "
            "during breakable capture, in DBO threads and for LoRA-wrapped or not stream-safe "
            "projections."
        ),
        upstream=(
            "No vLLM change found for MiniCPM3. The same pattern elsewhere: TensorRT-LLM "
            "NVIDIA/TensorRT-LLM#13629 (DSv4 compressor beside q_b_proj + norm, +2.2 % "
            "tokens/s), SGLang sgl-project/sglang#16637 (DSv32 dual-stream decode)."
        ),
        remove_when=(
            "vLLM runs MiniCPM3Attention's q path and kv_a_proj_with_mqa concurrently itself "
            "(maybe_execute_in_parallel in its forward) or fuses q_a_proj and "
            "kv_a_proj_with_mqa into one GEMM, as DeepSeek's fused_qkv_a_proj does."
        ),
    ),
)

KIMI_MLA_MODULE = "vllm.models.kimi_k3.nvidia.mla"

# MultiHeadLatentAttention._forward_full_rank_q (Kimi-Linear: no q_lora_rank): the full-rank q
# projection and its head view, then the kv latent projection, both on the layer's input. The
# method binds both projections to locals first; the site takes them as parameters.
KIMI_Q_AND_KV_A = Anchor(
    find="""
        q = q_proj(hidden_states)[0].view(-1, self.num_local_heads, self.qk_head_dim)
        kv_lora = kv_a_proj_with_mqa(hidden_states)[0]
    """,
    replace="""
        q, kv_lora = __site__.q_beside_kv_a(self, hidden_states, q_proj, kv_a_proj_with_mqa)
    """,
)

KIMI_LINEAR = Site(
    id="kv_a_proj_kimi_linear",
    feature="kv_a_proj",
    summary="Kimi-Linear MLA: q_proj (full rank) on the current stream beside kv_a_proj_with_mqa on the aux stream",
    targets=(Target(KIMI_MLA_MODULE, "MultiHeadLatentAttention._forward_full_rank_q"),),
    forms=(
        Form(
            (KIMI_Q_AND_KV_A,),
            current=Branch(
                "q = q_proj(hidden_states)[0].view(-1, self.num_local_heads, self.qk_head_dim)", returns="q"
            ),
            aux=Branch("kv_lora = kv_a_proj_with_mqa(hidden_states)[0]", returns="kv_lora"),
        ),
    ),
    entry="q_beside_kv_a",
    params=("self", "hidden_states", "q_proj", "kv_a_proj_with_mqa"),
    tokens="hidden_states",
    # Kimi-Linear's model is not compiled (breakable CUDA graphs, no support_torch_compile):
    # a plain call; under Dynamo, upstream's lines.
    dynamo="plain",
    # forward calls _forward_full_rank_q only where the layer has no q low-rank path
    reached_when="self.q_lora_rank is None",
    facts=Facts(
        why=(
            "Kimi-Linear's MLA layers (no q low-rank path) run the full-rank q_proj and the kv "
            "latent projection kv_a_proj_with_mqa back to back on one stream, though both read "
            "only the layer's input; at decode kv_a_proj_with_mqa (hidden -> kv_lora + rope) "
            "is a skinny GEMM beside a wide one."
        ),
        how=(
            "_forward_full_rank_q runs without torch.compile: q_proj and its head view on the "
            "current stream beside kv_a_proj_with_mqa on vLLM's aux stream, through the stream "
            "primitive within the token range; the kv split and layernorm follow the join. The "
            "model defaults to breakable CUDA graphs: from vLLM 0.30 decode batches are captured "
            "as FULL graphs, where the fork is captured; mixed batches go through breakable "
            "capture, where it runs serially. Serial also without an aux stream, outside the "
            "range, in DBO threads and for LoRA-wrapped or not stream-safe projections. Layers "
            "with a q low-rank path (Kimi-K3) never reach it."
        ),
        upstream=(
            "No vLLM change found. Kimi-K3's q low-rank path fuses q_a and kv_a into one GEMM "
            "(fused_qkv_a_proj); the full-rank path keeps two."
        ),
        remove_when=(
            "vLLM runs _forward_full_rank_q's q_proj and kv_a_proj_with_mqa concurrently "
            "itself or fuses them into one GEMM."
        ),
    ),
)

FEATURE = Feature(
    name="kv_a_proj",
    summary="kv_a_proj_with_mqa on the aux stream beside the q path (MiniCPM3, Kimi-Linear MLA)",
    sites=(MINICPM3, KIMI_LINEAR),
    settings=FeatureConfig,
    model_check=needs_kv_lora,
)
