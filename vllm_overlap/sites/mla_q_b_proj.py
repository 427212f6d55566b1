"""mla_q_b_proj: the MLA q path (q_b_proj, W_UK_T bmm or RoPE) beside the indexer's q path."""

from __future__ import annotations

from vllm_overlap.engine.rewrite import Anchor, Target
from vllm_overlap.engine.settings import FeatureConfig
from vllm_overlap.engine.site import Branch, Callee, Facts, Feature, Form, Site
from vllm_overlap.sites.deepseek_indexer import V32_MODULE, needs_indexer

LEGACY_MODULE = "vllm.model_executor.layers.mla"

# V3.2 CUDA path: the q path and the indexer's q projection, back to back upstream. The q
# path's bmm is written three ways across releases; the indexer's part is the same in all.
_V32_Q = """
        q = self.q_b_proj(q_c)[0].view(-1, self.num_local_heads, self.qk_head_dim)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
"""
_V32_INDEX_Q = """
        if self.indexer is not None and not self.skip_topk:
            index_q = self.indexer.wq_b(q_c)[0]
            index_q = index_q.view(-1, self.indexer.n_head, self.indexer.head_dim)
        else:
            index_q = None
"""


def _v32_q_paths(bmm: str, prepare_mqa_query: str) -> Anchor:
    """The q path with its W_UK_T bmm written as ``bmm``, then the indexer's q projection."""
    return Anchor(
        find=_V32_Q + bmm + _V32_INDEX_Q,
        replace=f"""
        (q, q_nope, q_pe, ql_nope), index_q = (
            __site__.q_b_proj_beside_index_q(self, q_c, {prepare_mqa_query})
        )
    """,
    )


V32_Q_PATHS = _v32_q_paths(
    """
        if prepare_mqa_query:
            ql_nope = torch.bmm(q_nope.transpose(0, 1), self.W_UK_T).transpose(0, 1)
        else:
            ql_nope = q_nope
""",
    "prepare_mqa_query",
)
# vLLM 0.30 / 0.31: the W_UK_T bmm unconditional (no prepare_mqa_query yet).
V32_Q_PATHS_BMM_ALWAYS = _v32_q_paths(
    """
        ql_nope = torch.bmm(q_nope.transpose(0, 1), self.W_UK_T).transpose(0, 1)
""",
    "True",
)
# vLLM 0.28: the q_nope transpose a statement of its own before the bmm.
V32_Q_PATHS_TRANSPOSE_FIRST = _v32_q_paths(
    """
        q_nope = q_nope.transpose(0, 1)
        ql_nope = torch.bmm(q_nope, self.W_UK_T).transpose(0, 1)
""",
    "True",
)

# Legacy path: q projection, its view, the MLA RoPE, then the indexer call.
LEGACY_Q_AND_INDEXER = Anchor(
    find="""
        q = q_proj_layer(q_proj_input)[0]
        heads = self.num_heads
        if self.dcp_q_replicate:
            heads *= q_proj_layer.group_size
        q = q.view(-1, heads, self.qk_head_dim)

        if self.rotary_emb is not None:
            q[..., self.qk_nope_head_dim :], k_pe = self.rotary_emb(
                positions, q[..., self.qk_nope_head_dim :], k_pe
            )

        if self.indexer and self.is_sparse and not self.skip_topk:
            self.indexer(hidden_states, q_c, positions, self.indexer_rope_emb)
    """,
    replace="""
        q, heads, k_pe = __site__.q_proj_beside_indexer(
            self, q_proj_layer, q_proj_input, positions, k_pe, hidden_states, q_c
        )
    """,
)

FACTS = dict(
    why=(
        "In DeepSeek-V3.2 attention the MLA q_b_proj and the indexer's wq_b both read q_c "
        "and nothing else of each other, yet vLLM runs them back to back on one stream; "
        "upstream measured q_b_proj + MLA RoPE at ~17 us per layer at decode, hideable "
        "behind the indexer's q path."
    ),
    upstream=(
        "vllm-project/vllm#39299 (independent q and indexer cones, open); SGLang "
        "sgl-project/sglang#16637 and #17688 (DSv32 dual-stream decode, merged)."
    ),
    remove_when=(
        "vLLM overlaps q_b_proj with the indexer's q path itself (maybe_execute_in_parallel "
        "or a fork op around these statements), or fuses q_b_proj and wq_b into one GEMM."
    ),
)

V32_Q_PATH = """
    q = self.q_b_proj(q_c)[0].view(-1, self.num_local_heads, self.qk_head_dim)
    q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
"""
V32_INDEX_Q = Branch(
    """
    index_q = self.indexer.wq_b(q_c)[0]
    index_q = index_q.view(-1, self.indexer.n_head, self.indexer.head_dim)
    """,
    returns="index_q",
)
V32_ACTIVE = "self.indexer is not None and not self.skip_topk"

V32 = Site(
    id="mla_q_b_proj_v32",
    feature="mla_q_b_proj",
    summary="V3.2 CUDA path: q_b_proj + split + W_UK_T bmm beside the indexer's wq_b",
    targets=(Target(V32_MODULE, "DeepseekV32Attention.forward"),),
    forms=(
        Form(
            (V32_Q_PATHS,),
            current=V32_INDEX_Q,
            aux=Branch(
                V32_Q_PATH
                + """
    if prepare_mqa_query:
        ql_nope = torch.bmm(q_nope.transpose(0, 1), self.W_UK_T).transpose(0, 1)
    else:
        ql_nope = q_nope
    """,
                returns="q, q_nope, q_pe, ql_nope",
            ),
            active=V32_ACTIVE,
        ),
        Form(
            (V32_Q_PATHS_BMM_ALWAYS,),
            current=V32_INDEX_Q,
            aux=Branch(
                V32_Q_PATH
                + """
    ql_nope = torch.bmm(q_nope.transpose(0, 1), self.W_UK_T).transpose(0, 1)
    """,
                returns="q, q_nope, q_pe, ql_nope",
            ),
            active=V32_ACTIVE,
        ),
        Form(
            (V32_Q_PATHS_TRANSPOSE_FIRST,),
            current=V32_INDEX_Q,
            aux=Branch(
                V32_Q_PATH
                + """
    q_nope = q_nope.transpose(0, 1)
    ql_nope = torch.bmm(q_nope, self.W_UK_T).transpose(0, 1)
    """,
                returns="q, q_nope, q_pe, ql_nope",
            ),
            active=V32_ACTIVE,
        ),
    ),
    entry="q_b_proj_beside_index_q",
    params=("self", "q_c", "prepare_mqa_query"),
    tokens="q_c",
    dynamo="plain",
    stack=1,  # after deepseek_indexer_v32 on DeepseekV32Attention.forward
    result=lambda index_q, q_outputs: (q_outputs, index_q),
    facts=Facts(
        how=(
            "DeepseekV32Attention.forward runs without Dynamo, under breakable CUDA graphs: "
            "q_b_proj, its split and the W_UK_T bmm on vLLM's aux stream beside indexer.wq_b "
            "on the current stream, a plain call of the stream primitive that forks and joins "
            "inside the call (serial during breakable capture). Serial outside the token "
            "range, without an aux stream, in DBO micro-batch threads, for LoRA and in layers "
            "without an active indexer."
        ),
        **FACTS,
    ),
)

LEGACY = Site(
    id="mla_q_b_proj_legacy",
    feature="mla_q_b_proj",
    summary="MLA wrapper: the q projection + MLA RoPE beside the whole indexer call, eager only",
    targets=(Target(LEGACY_MODULE, "MultiHeadLatentAttentionWrapper.forward"),),
    forms=(
        Form(
            (LEGACY_Q_AND_INDEXER,),
            current=Branch(
                "self.indexer(hidden_states, q_c, positions, self.indexer_rope_emb)",
                returns="None",
            ),
            aux=Branch(
                LEGACY_Q_AND_INDEXER.find.split("if self.indexer and")[0],
                returns="q, heads, k_pe",
            ),
            active="self.indexer and self.is_sparse and not self.skip_topk",
        ),
    ),
    # Glm5Next builds this wrapper around its own indexer (and runs it eagerly): only
    # DeepSeek's legacy Indexer, whose statements the site was checked with, runs beside.
    callees=(Callee("self.indexer", "vllm.model_executor.models.deepseek_v2", "Indexer"),),
    entry="q_proj_beside_indexer",
    params=("self", "q_proj_layer", "q_proj_input", "positions", "k_pe", "hidden_states", "q_c"),
    tokens="hidden_states",
    dynamo="serial",
    result=lambda _, q_heads_k_pe: q_heads_k_pe,
    facts=Facts(
        how=(
            "MultiHeadLatentAttentionWrapper.forward: the q projection and MLA RoPE on the aux "
            "stream beside the whole self.indexer(...) call, in eager mode only: the indexer "
            "holds vllm::sparse_attn_indexer, a CUDA-graph splitting op, so under "
            "torch.compile a fork would span an eager break and the region runs upstream's "
            "statements. Serial outside the token range, without an aux stream, in DBO "
            "micro-batch threads, for LoRA and in layers without an active indexer "
            "(DeepSeek-V3/R1)."
        ),
        **FACTS,
    ),
)

FEATURE = Feature(
    name="mla_q_b_proj",
    summary="the MLA q path (q_b_proj + W_UK_T bmm / RoPE) on the aux stream beside the "
    "indexer's q path",
    sites=(V32, LEGACY),
    settings=FeatureConfig,
    post_load="vllm_overlap.runtime.deepseek_post_load:post_load",
    post_load_modes=("dual_stream",),
    model_check=needs_indexer,
)
