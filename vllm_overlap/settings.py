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
    min_tokens: int = Field(1, ge=0)
    max_tokens: int = Field(1024, ge=0)

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
    # mode fused: what a layer that cannot be fused (quantised, mixed dtypes or sharding,
    # LoRA) runs instead: the upstream serial statements, or the dual-stream op.
    fused_fallback: Literal["serial", "dual_stream"] = "serial"
