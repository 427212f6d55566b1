"""Per-process state: the active config and what happened to each feature and target."""

from __future__ import annotations

from dataclasses import dataclass

from .config import FeatureConfig, LoadedConfig, OverlayConfig

APPLIED, SKIPPED, OFF, PENDING = "applied", "skipped", "off", "pending"


@dataclass(frozen=True)
class Outcome:
    feature: str
    target: str
    status: str  # applied / skipped / off / pending
    reason: str = ""
    path: str = ""  # the rewritten source file, when applied

    def describe(self) -> str:
        return f"{self.status}: {self.reason}" if self.reason else self.status


_loaded: LoadedConfig | None = None
outcomes: dict[tuple[str, str], Outcome] = {}
post_load_reports: dict[str, dict] = {}  # feature -> what its post-load step did


def set_loaded(loaded: LoadedConfig) -> None:
    global _loaded
    _loaded = loaded


def loaded() -> LoadedConfig:
    return _loaded or LoadedConfig(OverlayConfig(), "built-in defaults")


def feature_config(name: str) -> FeatureConfig:
    return loaded().config.feature(name)


def record(outcome: Outcome) -> None:
    outcomes[(outcome.feature, outcome.target)] = outcome


def feature_outcomes(feature: str) -> list[Outcome]:
    return [o for (f, _), o in outcomes.items() if f == feature]
