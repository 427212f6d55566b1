"""doctor --model answers from the architecture vLLM builds, then the feature's config check:
the answers for every architecture the docs name, and for those whose loose config
attributes used to make doctor say "uses it" (expected answers read from vLLM 0.32/0.33's
model code, not from the table under test)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from vllm_overlap.cli.doctor import model_features
from vllm_overlap.engine.architectures import ARCHITECTURES, in_model_registry

GDN_LAYERS = {"layer_types": ["linear_attention", "full_attention"]}
MLA = {"kv_lora_rank": 512}
INDEXER = {"kv_lora_rank": 512, "index_topk": 2048}
KIMI_KDA = {"linear_attn_config": {"kda_layers": [1, 2, 3], "full_attn_layers": [4]}}
BAILING = {"model_type": "bailing_hybrid", "layer_group_size": 5}
USES = "uses it"


def _answers(arch, **attrs):
    config = SimpleNamespace(architectures=[arch], **attrs)
    return {r["feature"]: r["this model"] for r in model_features(config)}


@pytest.mark.parametrize(
    "arch, attrs, uses",
    [
        ("Qwen3NextForCausalLM", GDN_LAYERS, {"gdn_in_proj"}),
        ("Qwen3_5MoeForCausalLM", GDN_LAYERS, {"gdn_in_proj"}),
        ("MiniCPMV4_6ForConditionalGeneration", GDN_LAYERS, {"gdn_in_proj"}),
        ("InternS2MobiusForConditionalGeneration", GDN_LAYERS, {"gdn_in_proj"}),
        ("Qwen4ExpForCausalLM", GDN_LAYERS, {"gdn_in_proj"}),
        ("DeepseekV32ForCausalLM", INDEXER, {"deepseek_indexer", "mla_q_b_proj"}),
        ("GlmMoeDsaForCausalLM", INDEXER, {"deepseek_indexer", "mla_q_b_proj"}),
        ("DeepseekV3ForCausalLM", INDEXER, {"deepseek_indexer", "mla_q_b_proj"}),
        ("DeepseekV3ForCausalLM", MLA, set()),  # no indexer: the config check says so
        ("Dots3NoteForCausalLM", INDEXER, set()),  # legacy Indexer, refused inside Dots3Note
        # loose attributes that used to read "uses it"
        ("OlmoHybridForCausalLM", GDN_LAYERS, {"delta_in_proj"}),
        ("AliceAIForCausalLM", GDN_LAYERS, {"delta_in_proj"}),  # KimiGatedDeltaNetAttention
        ("KimiLinearForCausalLM", {**KIMI_KDA, **MLA}, {"delta_in_proj", "kv_a_proj"}),
        ("KimiLinearForCausalLM", {"linear_attn_config": {"kda_layers": []}, **MLA}, {"kv_a_proj"}),
        ("KimiK3ForConditionalGeneration", {**KIMI_KDA, **MLA}, set()),  # KimiK3DeltaAttention
        ("Glm5NextForCausalLM", {**GDN_LAYERS, **INDEXER}, set()),
        ("HYV4ForCausalLM", INDEXER, set()),
        ("Step5ForCausalLM", INDEXER, set()),
        # KDA layers from layer_group_size (bailing_moe_v3._is_kda_layer), MLA on the others
        ("BailingMoeV3ForCausalLM", {**BAILING, **MLA}, {"delta_in_proj"}),
        ("BailingMoeV3VLForConditionalGeneration", {**BAILING, **MLA}, {"delta_in_proj"}),
        ("BailingMoeV3ForCausalLM", {**BAILING, **MLA, "layer_group_size": 1}, set()),  # none
        ("BailingMoeV3MTPModel", {**BAILING, **MLA}, set()),  # its MTP layer is MLA
        ("MiniCPM3ForCausalLM", MLA, {"kv_a_proj"}),
    ],
)
def test_doctor_model_answers_by_architecture(arch, attrs, uses):
    answers = _answers(arch, **attrs)
    assert {f for f, a in answers.items() if a == USES} == uses, answers
    for feature, answer in answers.items():
        if feature not in uses:
            assert answer.startswith("skipped: ") and len(answer) > len("skipped: "), answer


def test_why_an_architecture_runs_none_of_a_features_sites():
    answers = _answers("OlmoHybridForCausalLM", **GDN_LAYERS)
    assert answers["gdn_in_proj"] == (
        "skipped: OlmoHybridForCausalLM runs none of its sites (OlmoHybridGatedDeltaNetAttention "
        "on its linear_attention layers (not Qwen's GDN class: gdn_in_proj does not apply))"
    )
    assert _answers("DeepseekV3ForCausalLM", **MLA)["mla_q_b_proj"].startswith("skipped: no indexer:")


def test_a_multimodal_config_is_answered_by_its_text_architecture():
    text = SimpleNamespace(architectures=["Qwen3_5ForCausalLM"], **GDN_LAYERS)
    config = SimpleNamespace(architectures=["SomeVisionWrapperForConditionalGeneration"], text_config=text)
    config.get_text_config = lambda: text
    answers = {r["feature"]: r["this model"] for r in model_features(config)}
    assert answers["gdn_in_proj"] == USES


def test_architectures_outside_the_table():
    llama = _answers("LlamaForCausalLM", **GDN_LAYERS)["gdn_in_proj"]
    assert llama == (
        "skipped: LlamaForCausalLM is not an architecture the overlay knows to build its "
        "layers (read from vLLM 0.32 and 0.33)"
    )
    assert _answers("NoSuchModelForCausalLM")["gdn_in_proj"] == (
        "skipped: NoSuchModelForCausalLM is not in this vLLM's model registry"
    )


# In vLLM 0.33's registry, not yet in 0.32's (the CI's).
NEW_IN_033 = {
    "ClefFlashForJointSchema",
    "D3ForSequenceClassification",
    "MiniCPMOcrForConditionalGeneration",
    "AliceAIForCausalLM",
    "Step5ForCausalLM",
    "Step5ForConditionalGeneration",
    "Step5MTP",
}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_in_the_table_is_one_vllm_registers(arch):
    """A name vLLM does not register would never match a model: a typo, or a rename."""
    assert in_model_registry(arch) or arch in NEW_IN_033
