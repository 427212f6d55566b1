"""delta_in_proj: a delta-attention layer's input projections beside each other (OLMo Hybrid)."""

from __future__ import annotations

from ..rewrite import Anchor, Target
from ..settings import FeatureConfig
from ..site import Branch, Facts, Feature, Form, Site, text_config

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
    layer_types = getattr(text_config(hf_config), "layer_types", None) or ()
    if "linear_attention" not in layer_types:
        return "no delta-attention layers (no linear_attention in its layer_types)"
    return None


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

FEATURE = Feature(
    name="delta_in_proj",
    summary="delta-attention input projections beside each other (OLMo Hybrid GDN)",
    sites=(OLMO_HYBRID,),
    settings=FeatureConfig,
    model_check=needs_linear_attention,
)
