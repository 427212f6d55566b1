"""What happened to each feature's rewrite of each target in this process."""

from __future__ import annotations

from dataclasses import dataclass

APPLIED, SKIPPED, OFF, PENDING = "applied", "skipped", "off", "pending"
# A target of another vLLM release (a site's alternative module, class or method) that this
# vLLM does not have: nothing to rewrite, and nothing wrong.
ABSENT = "absent"
# A target where upstream now forks the site's pair itself (``vllm_overlap.engine.upstream``): the
# overlay steps aside there; never a reason for strict to stop.
UPSTREAM = "upstream"


@dataclass(frozen=True)
class Outcome:
    feature: str
    target: str
    status: str  # applied / skipped / absent / upstream / off / pending
    reason: str = ""
    path: str = ""  # the rewritten source file, when applied

    def describe(self) -> str:
        return f"{self.status}: {self.reason}" if self.reason else self.status


outcomes: dict[tuple[str, str], Outcome] = {}


def record(outcome: Outcome) -> None:
    outcomes[(outcome.feature, outcome.target)] = outcome


def feature_outcomes(feature: str) -> list[Outcome]:
    return [o for (f, _), o in outcomes.items() if f == feature]
