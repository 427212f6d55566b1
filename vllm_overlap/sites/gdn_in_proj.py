"""gdn_in_proj: Qwen3-Next / Qwen3.5 Gated DeltaNet ``in_proj_qkvz`` beside ``in_proj_ba``."""

from __future__ import annotations

from vllm_overlap.engine.rewrite import Anchor, Target
from vllm_overlap.engine.settings import GdnInProjConfig
from vllm_overlap.engine.site import Branch, Facts, Feature, Form, ModeEntry, Output, Site, text_config

MODULE = "vllm.model_executor.layers.mamba.gdn.qwen_gdn_linear_attn"
CLASS = "QwenGatedDeltaNetAttention"
# vLLM 0.20 and 0.21: the same layer before the gdn/ package split (0.22), same statements.
# (0.20 defines only forward_cuda and forward_xpu: the others are absent there.)
OLD_MODULE = "vllm.model_executor.layers.mamba.gdn_linear_attn"
OLD_CLASS = "GatedDeltaNetAttention"
# Every forward variant of the layer that runs the two projections back to back.
VARIANTS = ("forward_cuda", "forward_hip", "forward_xpu", "forward_cpu")

# The two statements, whatever the variant names its results ($qkvz, $ba bind them).
IN_PROJ_PAIR = Anchor(
    find="""
        $qkvz, _ = self.in_proj_qkvz(hidden_states)
        $ba, _ = self.in_proj_ba(hidden_states)
    """,
    replace="""
        $qkvz, $ba = __site__.in_proj(self, hidden_states)
    """,
)


def needs_gdn(hf_config) -> str | None:
    layer_types = getattr(text_config(hf_config), "layer_types", None) or ()
    if "linear_attention" not in layer_types:
        return "no Gated DeltaNet layers (no linear_attention in its layer_types)"
    return None


SITE = Site(
    id="gdn_in_proj",
    feature="gdn_in_proj",
    summary="in_proj_qkvz on the current stream beside in_proj_ba on the aux stream",
    targets=(
        *(Target(MODULE, f"{CLASS}.{v}") for v in VARIANTS),
        *(Target(OLD_MODULE, f"{OLD_CLASS}.{v}") for v in VARIANTS),
    ),
    forms=(
        Form(
            (IN_PROJ_PAIR,),
            current=Branch("$qkvz, _ = self.in_proj_qkvz(hidden_states)", returns="$qkvz"),
            aux=Branch("$ba, _ = self.in_proj_ba(hidden_states)", returns="$ba"),
        ),
    ),
    entry="in_proj",
    params=("self", "hidden_states"),
    tokens="hidden_states",
    dynamo="op",
    outputs=(
        Output("qkvz", like="hidden_states", width="self.in_proj_qkvz"),
        Output("ba", like="hidden_states", width="self.in_proj_ba"),
    ),
    modes=(("fused", ModeEntry("fused_in_proj", "vllm_overlap.runtime.gdn_fuse:fused_in_proj")),),
    dispatch="_forward_method",
    upstream_switch="vllm_overlap.runtime.gdn_upstream:settle",
    facts=Facts(
        why=(
            "At decode sizes the two input projections of every GDN layer are small GEMMs that "
            "leave most of the GPU idle, and vLLM runs them back to back on one stream; upstream "
            "measured +2 to +8 % decode tokens/s from running them together."
        ),
        how=(
            "mode dual_stream: the two statements become one call of "
            "torch.ops.vllm_overlap.gdn_in_proj (opaque to "
            "torch.compile, exact fake kernel from the per-rank output sizes, layer passed as "
            "LayerName), which forks in_proj_ba onto vLLM's aux stream within the configured "
            "token range and runs both serially elsewhere (CPU, outside the range, breakable "
            "capture, DBO micro-batch threads). LoRA-wrapped projections keep the serial path. "
            "mode fused: after loading, each layer's two weights are concatenated once into one "
            "projection (the originals released) and the statements become one GEMM and a split; "
            "layers that cannot be fused run the configured fallback."
        ),
        upstream=(
            "vllm-project/vllm#36795 (dual-stream, reverted in #38152: a str layer name compiled "
            "one graph per layer); #38123 (LayerName); re-land attempts #39748, #42301; "
            "single-GEMM alternative #41457."
        ),
        remove_when=(
            "vLLM runs in_proj_qkvz and in_proj_ba concurrently itself in every variant, for "
            "every model, compiled or not, or fuses them into one GEMM (#41457). Checked, not "
            "only written: from 0.34 forward_cuda forks the pair itself (execute_in_parallel on "
            "the layer's _ba_stream), so the overlay steps aside there (upstream), turns that "
            "path on for layers whose model did not opt in where upstream's conditions hold "
            "(CUDA, plain cuBLAS in_proj_ba, no ubatching, no LoRA, outside torch.compile), and "
            "keeps its rewrite of the other variants."
        ),
    ),
)

FEATURE = Feature(
    name="gdn_in_proj",
    summary=SITE.summary,
    sites=(SITE,),
    settings=GdnInProjConfig,
    extra_modes=("fused",),
    post_load="vllm_overlap.runtime.gdn_fuse:fuse_model",
    post_load_modes=("fused",),
    model_check=needs_gdn,
)
