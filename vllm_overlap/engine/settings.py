"""The settings models a feature runs with (pydantic, no torch): what each key of
``features.<name>`` in the config file may hold. ``config.py`` builds the file's model from the
registry; the declarations in ``patches/`` name their feature's model here."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class FeatureConfig(Strict):
    """Switch and token range of one feature: overlap runs for min_tokens <= n <= max_tokens.
    ``mode`` is narrowed per feature to the modes it declares."""

    enabled: bool = True
    mode: Literal["dual_stream"] = "dual_stream"
    min_tokens: int = Field(1, ge=0, le=2**31 - 1)
    max_tokens: int = Field(1024, ge=0, le=2**31 - 1)
    # When a call may fork: "capture", only while a CUDA graph is being captured (what the
    # graph replays; eager steps run serially, where a stream switch costs more host time than
    # it hides: vLLM 0.34's GDN path and TensorRT-LLM's multi-stream modules do the same), or
    # "always" (eager steps fork too).
    when: Literal["capture", "always"] = "capture"

    @model_validator(mode="after")
    def _range(self):
        if self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) is greater than max_tokens ({self.max_tokens})"
            )
        return self

    def overlaps(self, num_tokens: int) -> bool:
        return self.min_tokens <= num_tokens <= self.max_tokens


class GdnInProjConfig(FeatureConfig):
    # vLLM 0.34 overlaps this pair itself for at most 256 tokens (_BA_PROJ_OVERLAP_MAX_TOKENS in
    # qwen_gdn_linear_attn.py: across Qwen3.5/3.8 shapes, quant formats and TP 1-8 on GB300 the
    # first regression was at 272 tokens, 27B BF16 TP8).
    max_tokens: int = Field(256, ge=0, le=2**31 - 1)
    # mode fused: what a layer that cannot be fused (quantised, mixed dtypes or sharding,
    # LoRA) runs instead: the upstream serial statements, or the dual-stream op.
    fused_fallback: Literal["serial", "dual_stream"] = "serial"


USER_SITE_ID = r"^[a-z][a-z0-9_]{0,39}$"
QUALNAME = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$"


class UserSiteConfig(FeatureConfig):
    """One entry of ``sites:``: an overlap site the user declares. Its statement groups are
    written as upstream wrote them (matched as anchors, ``$name`` captures allowed); the
    overlay proves them independent against the installed vLLM's source before applying
    anything (``vllm_overlap.engine.user_sites``)."""

    id: str = Field(pattern=USER_SITE_ID)
    module: str = Field(pattern=QUALNAME)  # e.g. vllm.model_executor.models.minicpm3
    function: str = Field(pattern=QUALNAME)  # Class.method
    current: str = Field(min_length=1)  # the statements for the current stream
    aux: list[str] = Field(min_length=1)  # one group per aux stream
    tokens: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")  # the entry parameter whose first dimension counts tokens
    no_lora: list[str] = []  # further modules (self.<name>) that must not be LoRA-wrapped
    why: str = ""  # one line for doctor and the census

    @model_validator(mode="after")
    def _groups(self):
        groups = [self.current, *self.aux]
        for text in groups:
            if not text.strip():
                raise ValueError("a statement group is empty")
        if len({g.strip() for g in groups}) != len(groups):
            raise ValueError("two statement groups are the same text")
        return self

    @property
    def feature_name(self) -> str:
        return f"user_{self.id}"
