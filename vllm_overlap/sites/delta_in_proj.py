"""delta_in_proj: a delta-attention layer's input projections beside each other (OLMo Hybrid's
Gated DeltaNet, BailingMoeV3's and Kimi-Linear's Kimi delta attention)."""

from __future__ import annotations

import textwrap

from vllm_overlap.engine.rewrite import Anchor, Target
from vllm_overlap.engine.settings import FeatureConfig
from vllm_overlap.engine.site import Branch, Facts, Feature, Form, Output, Site, text_config

OLMO_MODULE = "vllm.model_executor.layers.mamba.gdn.olmo_gdn_linear_attn"
OLMO_CLASS = "OlmoHybridGatedDeltaNetAttention"
# vLLM 0.20 and 0.21: the same layer in the model's own module, the same statements.
OLD_OLMO_MODULE = "vllm.model_executor.models.olmo_hybrid"
OLD_OLMO_CLASS = "OlmoHybridGatedDeltaNet"

# _full_forward: the fused q/k/v/gate projection and its split, then b and a, each its own GEMM
# (kept apart upstream for the gating scalars' precision). The split reads only the first
# projection's output, so b and a can start with it; the split stays after both.
OLMO_IN_PROJ = Anchor(
    find="""
        projected_qkvg, _ = self.in_proj_qkvg(hidden_states)
        conv_dim_sharded = (self.key_dim * 2 + self.value_dim) // self.tp_size
        mixed_qkv = projected_qkvg[..., :conv_dim_sharded]
        gate = projected_qkvg[..., conv_dim_sharded:]

        b, _ = self.b_proj(hidden_states)
        a, _ = self.a_proj(hidden_states)
    """,
    replace="""
        projected_qkvg, (b, a) = __site__.in_proj(self, hidden_states)
        conv_dim_sharded = (self.key_dim * 2 + self.value_dim) // self.tp_size
        mixed_qkv = projected_qkvg[..., :conv_dim_sharded]
        gate = projected_qkvg[..., conv_dim_sharded:]
    """,
)


def needs_linear_attention(hf_config) -> str | None:
    """OLMo Hybrid and AliceAI list their delta-attention layers in ``layer_types``; Kimi-Linear
    in ``linear_attn_config["kda_layers"]``; BailingMoeV3 makes all but every
    ``layer_group_size``-th layer one (``bailing_moe_v3._is_kda_layer``)."""
    config = text_config(hf_config)
    if "linear_attention" in (getattr(config, "layer_types", None) or ()):
        return None
    kda = getattr(config, "linear_attn_config", None)
    if isinstance(kda, dict) and kda.get("kda_layers"):
        return None
    group = getattr(config, "layer_group_size", None)
    if getattr(config, "model_type", "") == "bailing_hybrid" and isinstance(group, int) and group > 1:
        return None
    return "no delta-attention layers (no linear_attention in its layer_types)"


OLMO_HYBRID = Site(
    id="delta_in_proj_olmo_hybrid",
    feature="delta_in_proj",
    summary="OLMo Hybrid GDN: in_proj_qkvg on the current stream beside b_proj + a_proj on the aux stream",
    targets=(
        Target(OLMO_MODULE, f"{OLMO_CLASS}._full_forward"),
        Target(OLD_OLMO_MODULE, f"{OLD_OLMO_CLASS}._full_forward"),
    ),
    forms=(
        Form(
            (OLMO_IN_PROJ,),
            current=Branch("projected_qkvg, _ = self.in_proj_qkvg(hidden_states)", returns="projected_qkvg"),
            aux=Branch(
                """
                b, _ = self.b_proj(hidden_states)
                a, _ = self.a_proj(hidden_states)
                """,
                returns="b, a",
            ),
        ),
    ),
    entry="in_proj",
    params=("self", "hidden_states"),
    tokens="hidden_states",
    # _full_forward runs inside vLLM's opaque op vllm::olmo_hybrid_gdn_full_forward (an eager
    # break under breakable capture): torch.compile never traces it.
    dynamo="plain",
    facts=Facts(
        why=(
            "OLMo Hybrid's Gated DeltaNet layers run the fused q/k/v/gate projection and then the "
            "b and a projections back to back on one stream; at decode b and a are tiny GEMMs "
            "(7B: 3840 -> 30 each) that leave the GPU idle after the large one (3840 -> 17280). "
            "Upstream keeps b and a unfused for precision; two streams keep each GEMM's kernel."
        ),
        how=(
            "_full_forward (run by vLLM's opaque op olmo_hybrid_gdn_full_forward, never traced by "
            "torch.compile) calls the stream primitive: in_proj_qkvg on the current stream beside "
            "b_proj then a_proj on vLLM's aux stream, within the token range; the q/k/v/gate split "
            "follows the join. Serial without an aux stream, outside the range, during breakable "
            "capture, in DBO threads and for LoRA-wrapped or not stream-safe projections."
        ),
        upstream=(
            "No vLLM change found for OLMo Hybrid. The same pair in Qwen GDN layers: "
            "vllm-project/vllm#36795 (reverted in #38152), this project's gdn_in_proj."
        ),
        remove_when=(
            "vLLM runs OlmoHybridGatedDeltaNetAttention's in_proj_qkvg and b_proj / a_proj "
            "concurrently itself (maybe_execute_in_parallel in _full_forward)."
        ),
    ),
)

BAILING_MODULE = "vllm.model_executor.models.bailing_moe_v3"

# BailingMoeV3KimiDeltaAttention.forward (0.28.0 to 0.33.0): q/k/v and beta from one fused
# GEMM (qkvb_proj), or from qkv_proj and b_proj where an fp8 checkpoint leaves b_proj
# unquantised; then the forget gate f_proj and the output gate g_proj, all three reading only
# the layer's input. The fused path runs the three GEMMs as a fan-out; the split, beta and the
# gate kernel (fused_kda_gate, Triton) follow the join. The separate-b_proj path keeps
# upstream's statements in upstream's order.
# Each upstream line is written once below; the anchor's find and replace are composed of them.
_SEPARATE_B = """\
assert self.qkv_proj is not None and self.b_proj is not None
qkv = self.qkv_proj(hidden_states)[0]
q, k, v = qkv.split(self.projection_size_per_partition, dim=-1)
beta_logits = self.b_proj(hidden_states)[0]
"""
_QKVB = "qkvb = self.qkvb_proj(hidden_states)[0]\n"
_QKVB_SPLIT = """\
q, k, v, beta_logits = qkvb.split(
    [
        self.projection_size_per_partition,
        self.projection_size_per_partition,
        self.projection_size_per_partition,
        self.local_num_heads,
    ],
    dim=-1,
)
"""
_BETA = "beta = beta_logits.float().sigmoid().unsqueeze(0)\n"
_F_PROJ = "g1 = self.f_proj(hidden_states)[0]\n"
_GATE = """\
g1 = fused_kda_gate(
    g1,
    self.A_log,
    self.head_dim,
    g_bias=self.dt_bias,
    lower_bound=self.lower_bound if self.safe_gate else None,
)
g1 = g1.unsqueeze(0)
"""
_G2 = 'g2 = rearrange(self.g_proj(hidden_states)[0], "... (h d) -> ... h d", d=self.head_dim)\n'


def _arm(text: str) -> str:
    return textwrap.indent(text, "    ")


BAILING_QKVB_F_G = Anchor(
    find=(
        "if self.separate_b_proj:\n"
        + _arm(_SEPARATE_B)
        + "else:\n"
        + _arm("assert self.qkvb_proj is not None\n" + _QKVB + _QKVB_SPLIT)
        + _BETA + _F_PROJ + _GATE + _G2
    ),
    replace=(
        "if self.separate_b_proj:\n"
        + _arm(_SEPARATE_B + _BETA + _F_PROJ + _GATE + _G2)
        + "else:\n"
        + _arm(
            "assert self.qkvb_proj is not None\n"
            "qkvb, g1, g2 = __site__.qkvb_beside_f_g(self, hidden_states)\n"
            + _QKVB_SPLIT + _BETA + _GATE
        )
    ),
)

BAILING_MOE_V3 = Site(
    id="delta_in_proj_bailing_moe_v3",
    feature="delta_in_proj",
    summary=(
        "BailingMoeV3 KDA: qkvb_proj on the current stream beside f_proj and g_proj, each on an "
        "aux stream of its own, as a custom op"
    ),
    targets=(Target(BAILING_MODULE, "BailingMoeV3KimiDeltaAttention.forward"),),
    forms=(
        Form(
            (BAILING_QKVB_F_G,),
            current=Branch(_QKVB, returns="qkvb"),
            aux=(Branch(_F_PROJ, returns="g1"), Branch(_G2, returns="g2")),
        ),
    ),
    entry="qkvb_beside_f_g",
    reached_when="not self.separate_b_proj",
    params=("self", "hidden_states"),
    tokens="hidden_states",
    dynamo="op",
    op_name="delta_in_proj_bailing_moe_v3",
    outputs=(
        Output("qkvb", like="hidden_states", width="self.qkvb_proj"),
        Output("g1", like="hidden_states", width="self.f_proj"),
        Output("g2", like="hidden_states", width="self.g_proj", heads="self.head_dim"),
    ),
    # The layer puts itself in vLLM's forward context under its prefix (layer_name_expr's
    # default), as its KDA op finds it.
    facts=Facts(
        why=(
            "BailingMoeV3's Kimi-delta-attention layers run three GEMMs that read only the "
            "layer's input back to back on one stream: qkvb_proj, the forget gate f_proj and "
            "the output gate g_proj (each q/k/v/g width is heads x head_dim, 4096 for a "
            "32-head model; f and g are a third of qkvb each), while decode leaves most of the "
            "GPU idle during each."
        ),
        how=(
            "The model is traced by torch.compile: on the fused path (qkvb_proj) the three GEMMs "
            "become torch.ops.vllm_overlap.delta_in_proj_bailing_moe_v3 (exact fake kernel from "
            "the per-rank widths, g2 viewed as heads; the layer found by its prefix in vLLM's "
            "forward context), which runs qkvb_proj on the current stream beside f_proj and "
            "g_proj on two aux streams through vLLM's execute_in_parallel, within the token "
            "range; the split, beta and the fused_kda_gate kernel follow the join. Checkpoints "
            "that keep b_proj apart (separate_b_proj) run upstream's statements. Serial "
            "without an aux stream, outside the range, during breakable capture, in DBO threads "
            "and for LoRA-wrapped or not stream-safe projections."
        ),
        upstream=(
            "No vLLM change found for BailingMoeV3's KDA projections. The fan-out form is "
            "vLLM's own: DeepSeek V4's _run_parallel_input_projections runs four input GEMMs "
            "through execute_in_parallel."
        ),
        remove_when=(
            "vLLM runs BailingMoeV3KimiDeltaAttention's qkvb_proj, f_proj and g_proj "
            "concurrently itself (execute_in_parallel in its forward) or fuses them into one "
            "GEMM."
        ),
    ),
)

KIMI_MODULE = "vllm.model_executor.layers.mamba.gdn.kimi_gdn_linear_attn"

# KimiGatedDeltaNetAttention.forward (Kimi-Linear, AliceAI): the fused q/k/v/beta/f_a
# projection, then (low-rank gate) g_a_proj -> g_b_proj on the layer's input. The split reads
# only the first projection's output, so the gate can start with it; the split stays after
# both. Full-rank-gate layers (g within the fused projection) keep upstream's statements.
_KIMI_IN_PROJ = "projected_qkvgfab = self.in_proj_qkvgfab(hidden_states)[0]\n"
_KIMI_FULL_RANK = """\
split_sizes = [
    3 * self.local_projection_size,
    self.local_projection_size,
    self.head_dim,
    self.local_num_heads,
]
if self.in_proj_padding:
    split_sizes.append(self.in_proj_padding)
projected = projected_qkvgfab.split(split_sizes, dim=-1)
mixed_qkv, g_proj_states, f_a, beta = projected[:4]
"""
_KIMI_LOW_RANK_SPLIT = """\
mixed_qkv, beta, f_a = projected_qkvgfab.split(
    [
        3 * self.local_projection_size,
        self.local_num_heads,
        self.head_dim,
    ],
    dim=-1,
)
"""
_KIMI_GATE = "g_proj_states = self.g_b_proj(self.g_a_proj(hidden_states)[0])[0]\n"

KIMI_IN_PROJ_AND_GATE = Anchor(
    find=(
        _KIMI_IN_PROJ
        + "if self.use_full_rank_gate:\n"
        + _arm(_KIMI_FULL_RANK)
        + "else:\n"
        + _arm(_KIMI_LOW_RANK_SPLIT + _KIMI_GATE)
    ),
    replace=(
        "if self.use_full_rank_gate:\n"
        + _arm(_KIMI_IN_PROJ + _KIMI_FULL_RANK)
        + "else:\n"
        + _arm(
            "projected_qkvgfab, g_proj_states = __site__.in_proj_beside_gate(self, hidden_states)\n"
            + _KIMI_LOW_RANK_SPLIT
        )
    ),
)

KIMI_GDN = Site(
    id="delta_in_proj_kimi_gdn",
    feature="delta_in_proj",
    summary=(
        "Kimi GDN (Kimi-Linear, AliceAI): in_proj_qkvgfab on the current stream beside the "
        "low-rank gate g_a_proj -> g_b_proj on the aux stream"
    ),
    targets=(Target(KIMI_MODULE, "KimiGatedDeltaNetAttention.forward"),),
    forms=(
        Form(
            (KIMI_IN_PROJ_AND_GATE,),
            current=Branch(_KIMI_IN_PROJ, returns="projected_qkvgfab"),
            aux=Branch(_KIMI_GATE, returns="g_proj_states"),
        ),
    ),
    entry="in_proj_beside_gate",
    reached_when="not self.use_full_rank_gate",
    params=("self", "hidden_states"),
    tokens="hidden_states",
    # vLLM runs these models without torch.compile (breakable CUDA graphs by default, and no
    # support_torch_compile on their models): a plain call; under Dynamo, upstream's lines.
    dynamo="plain",
    facts=Facts(
        why=(
            "Kimi-Linear's (and AliceAI's) Kimi-delta-attention layers run the fused "
            "q/k/v/beta/f_a projection and then the low-rank output gate g_a_proj -> g_b_proj "
            "back to back on one stream, though the gate reads only the layer's input; at decode "
            "the gate's two skinny GEMMs (hidden -> head_dim -> heads x head_dim) leave the GPU "
            "idle after the large one."
        ),
        how=(
            "KimiGatedDeltaNetAttention.forward runs without torch.compile: on the low-rank gate "
            "path it calls the stream primitive, in_proj_qkvgfab on the current stream beside "
            "g_a_proj then g_b_proj on vLLM's aux stream, within the token range; the split "
            "follows the join. Full-rank-gate layers run upstream's statements. These models "
            "default to breakable CUDA graphs: from vLLM 0.30 decode batches are captured as FULL "
            "graphs, where the fork is captured; mixed batches go through breakable capture, "
            "where it runs serially. Serial also without an aux stream, outside the range, in "
            "DBO threads and for LoRA-wrapped or not stream-safe projections."
        ),
        upstream=(
            "No vLLM change found for Kimi GDN's gate. vLLM overlaps other Kimi-K3 GEMMs itself "
            "(KimiK3DeltaAttention and the MoE take an aux_stream); the shared low-rank path "
            "does not."
        ),
        remove_when=(
            "vLLM runs KimiGatedDeltaNetAttention's in_proj_qkvgfab and g_a_proj / g_b_proj "
            "concurrently itself, or fuses g_a_proj into in_proj_qkvgfab."
        ),
    ),
)

FEATURE = Feature(
    name="delta_in_proj",
    summary="delta-attention input projections beside each other (OLMo Hybrid GDN, BailingMoeV3 KDA, Kimi GDN)",
    sites=(OLMO_HYBRID, BAILING_MOE_V3, KIMI_GDN),
    settings=FeatureConfig,
    model_check=needs_linear_attention,
)
