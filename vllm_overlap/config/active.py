"""The configuration this process runs with, and each feature's and site's settings in it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vllm_overlap.config.loader import FeatureConfig, LoadedConfig, OverlayConfig

if TYPE_CHECKING:
    from vllm_overlap.engine.site import Site

_loaded: LoadedConfig | None = None


def set_loaded(loaded: LoadedConfig) -> None:
    global _loaded
    _loaded = loaded


def loaded() -> LoadedConfig:
    return _loaded or LoadedConfig(OverlayConfig(), "built-in defaults")


def feature_config(name: str) -> FeatureConfig:
    return loaded().config.feature(name)


def site_config(site: "Site") -> FeatureConfig:
    """The settings a site runs with: its feature's."""
    return loaded().config.feature(site.feature)
