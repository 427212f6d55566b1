"""What a feature is: its rewrites and the four facts every patch must state.

Declarations only (no torch): ``register()`` reads them in every vLLM process, including
the API server, where nothing heavy may be imported.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from .rewrite import Anchor, Target


@dataclass(frozen=True)
class Rewrite:
    """The anchors to replace in one target function (one code shape of a feature)."""

    target: Target
    anchors: tuple[Anchor, ...]
    # The same statements as older vLLM releases wrote them: anchor sets tried in turn when
    # ``anchors`` (the newest release's) do not match.
    older: tuple[tuple[Anchor, ...], ...] = ()

    @property
    def anchor_sets(self) -> tuple[tuple[Anchor, ...], ...]:
        return (self.anchors, *self.older)


@dataclass(frozen=True)
class Feature:
    name: str
    summary: str  # one line: what runs beside what
    why: str
    how: str
    upstream: str
    remove_when: str
    rewrites: tuple[Rewrite, ...]
    runtime: str  # module the rewritten code calls, imported only when a rewrite applies
    # Replacement anchors per config mode, for modes other than dual_stream (same targets).
    mode_rewrites: tuple[tuple[str, tuple[Rewrite, ...]], ...] = ()
    # Run after the model's weights are loaded, before vLLM post-processes them:
    # "module:function" called with the model, in the modes listed in post_load_modes.
    post_load: str = ""
    post_load_modes: tuple[str, ...] = ()
    # Whether a model can use the feature, from its Hugging Face config alone (attribute
    # reads, no imports): None if it can, else the reason. ``vllm-overlap doctor --model``.
    model_check: Callable[[Any], str | None] | None = None

    @property
    def runtime_global(self) -> str:
        """The name under which the rewritten code sees ``runtime``."""
        return f"_vllm_overlap_{self.name}"

    @property
    def modes(self) -> tuple[str, ...]:
        return ("dual_stream", *(mode for mode, _ in self.mode_rewrites))

    def rewrites_for(self, mode: str = "dual_stream") -> tuple[Rewrite, ...]:
        return dict(self.mode_rewrites).get(mode, self.rewrites)

    def modules(self) -> list[str]:
        return sorted({r.target.module for r in self.rewrites})

    def rewrites_in(self, module: str, mode: str = "dual_stream") -> list[Rewrite]:
        return [r for r in self.rewrites_for(mode) if r.target.module == module]

    def load_runtime(self) -> ModuleType:
        return importlib.import_module(self.runtime)

    def facts(self) -> dict[str, str]:
        return {
            "Why": self.why,
            "How": self.how,
            "Upstream": self.upstream,
            "Remove when": self.remove_when,
        }


def text_config(hf_config: Any) -> Any:
    """The language model's config of a (possibly multimodal) Hugging Face config."""
    get = getattr(hf_config, "get_text_config", None)
    return get() if callable(get) else hf_config
