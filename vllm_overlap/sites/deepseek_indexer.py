"""deepseek_indexer: DeepSeek-V3.2's indexer k/w projection beside the layer's q path."""

from __future__ import annotations

from dataclasses import replace

from vllm_overlap.engine.rewrite import Anchor, Target
from vllm_overlap.engine.settings import FeatureConfig
from vllm_overlap.engine.site import Branch, Facts, Feature, Form, Output, Refusal, Site, text_config

V32_MODULE = "vllm.models.deepseek_v32.attention"
V32_ROCM_MODULE = "vllm.models.deepseek_v32.amd.rocm"
# vLLM 0.25 and 0.26: the V3.2 CUDA path's module before it moved up (the same statements;
# opt-in through model_class_overrides until 0.29).
V32_NVIDIA_MODULE = "vllm.models.deepseek_v32.nvidia.attention"
LEGACY_MODULE = "vllm.model_executor.models.deepseek_v2"

# V3.2 CUDA path (and its ROCm subclass): the A-projection, its split, and the indexer's
# k/w GEMM further down. The rewrite computes both in one call and keeps upstream's split
# and slicing; the condition is kept verbatim so index_k / index_weights mean what they did.
V32_A_PROJ = Anchor(
    find="""
        qkv_lora = self.fused_qkv_a_proj(hidden_states)[0]
        q_c, kv_c, k_pe = qkv_lora.split(
            [self.q_lora_rank, self.kv_lora_rank, self.qk_rope_head_dim], dim=-1
        )

        if self.indexer is not None and not self.skip_topk:
            kw = self.indexer.wk_weights_proj(hidden_states)[0]
            index_k = kw[:, : self.indexer.head_dim]
            index_weights = kw[:, self.indexer.head_dim :]
        else:
            index_k = None
            index_weights = None
    """,
    replace="""
        qkv_lora, kw = __site__.a_proj(self, hidden_states)
        q_c, kv_c, k_pe = qkv_lora.split(
            [self.q_lora_rank, self.kv_lora_rank, self.qk_rope_head_dim], dim=-1
        )

        if self.indexer is not None and not self.skip_topk:
            index_k = kw[:, : self.indexer.head_dim]
            index_weights = kw[:, self.indexer.head_dim :]
        else:
            index_k = None
            index_weights = None
    """,
)

# Legacy path: the q projection at the top of Indexer.forward ...
LEGACY_Q = Anchor(
    find="""
        q, _ = self.wq_b(qr)
        q = q.view(-1, self.n_head, self.head_dim)
    """,
    replace="""
        q, _vllm_overlap_kw, _vllm_overlap_k = __site__.q_and_k(
            self, hidden_states, qr
        )
        q = q.view(-1, self.n_head, self.head_dim)
    """,
)
# ... and, in each of its three branches (ROCm in-place RoPE, fused indexer-q, generic),
# the same k/w GEMM, split and k_norm: computed once above, beside the q projection.
LEGACY_K = Anchor(
    find="""
        $kw, _ = self.wk_weights_proj(hidden_states)
        $k = $kw[:, : self.head_dim]
        $weights = $kw[:, self.head_dim :]

        $k = self.k_norm($k)
    """,
    replace="""
        $kw = _vllm_overlap_kw
        $weights = $kw[:, self.head_dim :]

        $k = _vllm_overlap_k
    """,
    count=3,
)



def needs_indexer(hf_config) -> str | None:
    """vLLM builds the indexer exactly when the config has ``index_topk`` (its ``is_v32``)."""
    config = text_config(hf_config)
    if not hasattr(config, "kv_lora_rank"):
        return "not an MLA model (its config has no kv_lora_rank)"
    if not hasattr(config, "index_topk"):
        return (
            "no indexer: its config has no index_topk (MLA without DeepSeek Sparse "
            "Attention, e.g. DeepSeek-V3/R1)"
        )
    return None


FACTS = dict(
    why=(
        "The lightning indexer's fused k/w projection (hidden -> head_dim + n_head, 7168 -> "
        "192 on V3.2) is a thin GEMM that leaves most SMs idle, and vLLM runs it after the "
        "layer's q path on one stream although it reads only the layer input; upstream "
        "measured the indexer path at ~32 us per layer at decode, all serial."
    ),
    upstream=(
        "vllm-project/vllm#39299 (k+w path beside q path, open), #39943 (fork/join ops in "
        "mla.py, open), #35968 (weights_proj beside wk + k_norm, closed unmerged; its "
        "projections were fused by #38684)."
    ),
    remove_when=(
        "vLLM runs the indexer's wk_weights_proj on a second stream itself (#39943 or a "
        "successor lands: maybe_execute_in_parallel or an indexer fork op in these forwards)."
    ),
)

V32 = Site(
    id="deepseek_indexer_v32",
    feature="deepseek_indexer",
    summary="V3.2 CUDA path: fused_qkv_a_proj beside the indexer's wk_weights_proj",
    targets=(
        Target(V32_MODULE, "DeepseekV32Attention.forward"),
        Target(V32_ROCM_MODULE, "DeepseekV32MLAAttention.forward"),
        Target(V32_NVIDIA_MODULE, "DeepseekV32Attention.forward"),
    ),
    forms=(
        Form(
            (V32_A_PROJ,),
            current=Branch(
                "qkv_lora = self.fused_qkv_a_proj(hidden_states)[0]", returns="qkv_lora"
            ),
            aux=Branch("kw = self.indexer.wk_weights_proj(hidden_states)[0]", returns="kw"),
            active="self.indexer is not None and not self.skip_topk",
        ),
    ),
    entry="a_proj",
    params=("self", "hidden_states"),
    tokens="hidden_states",
    dynamo="plain",
    stack=0,
    facts=Facts(
        how=(
            "DeepseekV32Attention.forward (ROCm subclass too) runs without Dynamo, under "
            "breakable CUDA graphs: fused_qkv_a_proj(h) on the current stream beside "
            "indexer.wk_weights_proj(h) on vLLM's aux stream, a plain call of the stream "
            "primitive that forks and joins inside the call (serial during breakable capture). "
            "Serial outside the token range, without an aux stream, in DBO micro-batch "
            "threads, for LoRA-wrapped projections and in layers without an active indexer."
        ),
        **FACTS,
    ),
)

LEGACY = Site(
    id="deepseek_indexer_legacy",
    feature="deepseek_indexer",
    summary="legacy Indexer: wq_b(qr) beside wk_weights_proj(h) + k_norm, as a custom op",
    targets=(Target(LEGACY_MODULE, "Indexer.forward"),),
    forms=tuple(
        Form(
            (LEGACY_Q, replace(LEGACY_K, count=branches)),
            current=Branch("q, _ = self.wq_b(qr)", returns="q"),
            aux=Branch(LEGACY_K.find, returns="$kw, $k"),
        )
        # three branches since 0.25; two in 0.21-0.24 (no fused indexer-q); one in 0.20
        for branches in (3, 2, 1)
    ),
    entry="q_and_k",
    params=("self", "hidden_states", "qr"),
    tokens="hidden_states",
    dynamo="op",
    op_name="deepseek_indexer",
    outputs=(
        Output("q", like="qr", width="self.wq_b"),
        Output("kw", like="hidden_states", width="self.wk_weights_proj"),
        Output("k", like="hidden_states", width="self.head_dim"),
    ),
    result=lambda q, kw_k: (q, *kw_k),
    registry=True,  # an Indexer is not an attention layer: not in vLLM's forward context
    refused_inside=(
        Refusal(
            "vllm.models.dots3_note.nvidia.model",
            "Dots3NoteFullAttention",
            "Dots3Note calls the Indexer from its own forward (_forward_note_mla), and its "
            "module imports only with CUDA flash-attention: no CPU test runs that layer; "
            "refused until a GPU differential test does",
        ),
    ),
    facts=Facts(
        how=(
            "Indexer.forward is traced by torch.compile: wq_b(qr) beside wk_weights_proj(h) + "
            "k_norm as torch.ops.vllm_overlap.deepseek_indexer (LayerName, exact fake kernel, "
            "contiguous outputs, weights sliced outside the op), hoisted out of the three "
            "branches that each computed it. Serial outside the token range, without an aux "
            "stream, in DBO micro-batch threads and for LoRA-wrapped projections."
        ),
        **FACTS,
    ),
)

FEATURE = Feature(
    name="deepseek_indexer",
    summary="the indexer's wk_weights_proj (+ k_norm) on the aux stream beside the q path",
    sites=(V32, LEGACY),
    settings=FeatureConfig,
    post_load="vllm_overlap.runtime.deepseek_post_load:post_load",
    post_load_modes=("dual_stream",),
    model_check=needs_indexer,
)
