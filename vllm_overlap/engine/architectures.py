"""Which features a model's layers run, by the architecture vLLM builds for it (no torch).

``vllm-overlap doctor --model`` answers from ``config.architectures`` (and a multimodal
config's ``text_config.architectures``): an architecture listed here runs the sites of the
features it names, subject to the feature's own config check (``Feature.model_check``: GDN
layers present, an indexer present); any other architecture builds none of the layers the
overlay rewrites, or is not in this vLLM's registry at all. A loose attribute (any
``linear_attention`` layer, any ``index_topk``) is no longer enough: OLMo Hybrid and AliceAI
(``delta_in_proj`` sites of their own) and Glm5Next have ``linear_attention`` layers of other
classes; HY V4, Glm5Next and Step5 have indexers of their own.

The table was read from vLLM 0.32.0 and 0.33.0's model code (model class, the layer classes its
decoder layers build, and under which config condition); ``Reach.note`` says where.
"""

from __future__ import annotations

from dataclasses import dataclass

GDN = ("gdn_in_proj",)
DEEPSEEK = ("deepseek_indexer", "mla_q_b_proj")


@dataclass(frozen=True)
class Reach:
    features: tuple[str, ...]  # features whose sites its layers can run
    note: str  # which layers, and what decides


_QWEN_GDN = Reach(GDN, "QwenGatedDeltaNetAttention on its linear_attention layers")
_MTP_FULL = Reach((), "its MTP layer is full attention")
_LEGACY_MLA = Reach(
    DEEPSEEK,
    "MultiHeadLatentAttentionWrapper on MLA layers, with DeepSeek's Indexer when the config has "
    "index_topk",
)
_V32 = Reach(
    DEEPSEEK,
    "DeepseekV32Attention on CUDA (both features), DeepseekV32MLAAttention on ROCm "
    "(deepseek_indexer), the legacy wrapper and Indexer elsewhere",
)
_MLA_NO_INDEXER = Reach((), "MultiHeadLatentAttentionWrapper without an indexer: nothing to overlap")

ARCHITECTURES: dict[str, Reach] = {
    # Gated DeltaNet (QwenGatedDeltaNetAttention)
    **dict.fromkeys(
        (
            "Qwen3NextForCausalLM",
            "Qwen3_5ForCausalLM",
            "Qwen3_5MoeForCausalLM",
            "Qwen3_5ForConditionalGeneration",
            "Qwen3_5MoeForConditionalGeneration",
            "ColQwen3_5",
            "ClefFlashForJointSchema",
            "D3ForSequenceClassification",
            "MiniCPMV4_6ForConditionalGeneration",
            "MiniCPMV4_7ForConditionalGeneration",
            "MiniCPMOcrForConditionalGeneration",
            "InternS2PreviewForConditionalGeneration",
            "InternS2MobiusForConditionalGeneration",
            "Qwen4ExpForCausalLM",
            "Qwen4ExpForConditionalGeneration",
        ),
        _QWEN_GDN,
    ),
    **dict.fromkeys(
        ("Qwen3NextMTP", "Qwen3_5MTP", "Qwen3_5MoeMTP", "InternS2MobiusMTP", "Qwen4ExpMTP"),
        _MTP_FULL,
    ),
    "OlmoHybridForCausalLM": Reach(
        ("delta_in_proj",),
        "OlmoHybridGatedDeltaNetAttention on its linear_attention layers (not Qwen's GDN class: "
        "gdn_in_proj does not apply)",
    ),
    **dict.fromkeys(
        ("BailingMoeV3ForCausalLM", "BailingMoeV3VLForConditionalGeneration"),
        Reach(
            ("delta_in_proj",),
            "BailingMoeV3KimiDeltaAttention on its KDA layers (all but every layer_group_size-th; "
            "the others are MLA without an indexer)",
        ),
    ),
    "AliceAIForCausalLM": Reach(
        ("delta_in_proj",),
        "KimiGatedDeltaNetAttention on its linear_attention layers (not Qwen's GDN class: "
        "gdn_in_proj does not apply)",
    ),
    # DeepSeek MLA, legacy classes
    **dict.fromkeys(
        (
            "DeepseekV2ForCausalLM",
            "DeepseekV3ForCausalLM",
            "MistralLarge3ForCausalLM",
            "DeepSeekMTPModel",
            "KimiVLForConditionalGeneration",
            "KimiK25ForConditionalGeneration",
            "Glm4MoeLiteForCausalLM",
            "Glm4MoeLiteMTPModel",
            "LongcatFlashForCausalLM",
            "LongcatFlashNgramForCausalLM",
            "LongCatFlashMTPModel",
        ),
        _LEGACY_MLA,
    ),
    **dict.fromkeys(("DeepseekV32ForCausalLM", "GlmMoeDsaForCausalLM", "DeepseekV32MTPModel"), _V32),
    **dict.fromkeys(
        (
            "BailingMoeV3MTPModel",
            "BailingMoeV2_5ForCausalLM",
            "BailingMoeV25MTPModel",
            "AXK1ForCausalLM",
            "SarvamMLAForCausalLM",
        ),
        _MLA_NO_INDEXER,
    ),
    **dict.fromkeys(
        ("Dots3NoteForCausalLM", "Dots3NoteMTPModel"),
        Reach(
            (),
            "DeepSeek's legacy Indexer on its full-attention layers, called from Dots3Note's "
            "own forward: deepseek_indexer refuses it there (its module imports only with CUDA "
            "flash-attention, so no CPU test runs that layer); its MLA wrapper's forward is "
            "never called",
        ),
    ),
    **dict.fromkeys(
        ("Glm5NextForCausalLM", "Glm5NextForConditionalGeneration", "Glm5NextMTPModel"),
        Reach(
            (),
            "MultiHeadLatentAttentionWrapper around its own indexer class: mla_q_b_proj "
            "refuses it (not proven), and its linear_attention layers are another class",
        ),
    ),
    **dict.fromkeys(
        ("HYV4ForCausalLM", "HYV4MTPModel"), Reach((), "its own MLA attention and indexer")
    ),
    "KimiLinearForCausalLM": Reach(
        ("delta_in_proj", "kv_a_proj"),
        "KimiGatedDeltaNetAttention on its KDA layers (linear_attn_config's kda_layers, low-rank "
        "gate), Kimi's MultiHeadLatentAttention with a full-rank q on the others",
    ),
    **dict.fromkeys(
        ("KimiK3ForConditionalGeneration", "KimiK3MTPModel"),
        Reach((), "its own MLA and delta attention classes (KimiK3DeltaAttention, full-rank gate)"),
    ),
    "MiniCPM3ForCausalLM": Reach(
        ("kv_a_proj",), "MiniCPM3Attention on every layer (its q low-rank path beside kv_a_proj_with_mqa)"
    ),
    **dict.fromkeys(
        ("Step5ForCausalLM", "Step5ForConditionalGeneration", "Step5MTP"),
        Reach((), "its own sparse attention and indexer"),
    ),
    "DeepseekForCausalLM": Reach((), "multi-head attention (DeepseekAttention), not MLA"),
}


def architectures_of(hf_config) -> list[str]:
    """The architectures vLLM looks up for this config: its own, then its text config's."""
    found = list(getattr(hf_config, "architectures", None) or [])
    text = getattr(hf_config, "text_config", None)
    found += [a for a in (getattr(text, "architectures", None) or []) if a not in found]
    return found


def reach_reason(feature: str, architectures: list[str], in_registry) -> str | None:
    """None if one of ``architectures`` builds layers that run ``feature``'s sites, else why
    not. ``in_registry(name)``: whether this vLLM's model registry has the architecture."""
    if not architectures:
        return None  # nothing to look up: the feature's config check decides
    reasons = []
    for arch in architectures:
        reach = ARCHITECTURES.get(arch)
        if reach is not None and feature in reach.features:
            return None
        if reach is not None:
            reasons.append(f"{arch} runs none of its sites ({reach.note})")
        elif in_registry(arch):
            reasons.append(
                f"{arch} is not an architecture the overlay knows to build its layers "
                "(read from vLLM 0.32 and 0.33)"
            )
        else:
            reasons.append(f"{arch} is not in this vLLM's model registry")
    return "; ".join(reasons)


def in_model_registry(architecture: str) -> bool:
    """Whether this vLLM's model registry lists ``architecture`` (no model module imported)."""
    try:
        from vllm.model_executor.models.registry import ModelRegistry

        return architecture in ModelRegistry.models
    except Exception:  # doctor reports, it does not fail
        return False


def model_reason(feature, hf_config) -> str | None:
    """None if a model with this Hugging Face config runs ``feature``'s sites (a Feature): by
    the architecture vLLM builds, then the feature's own config check; else why not."""
    reason = reach_reason(feature.name, architectures_of(hf_config), in_model_registry)
    if reason is None and feature.model_check is not None:
        reason = feature.model_check(hf_config)
    return reason
