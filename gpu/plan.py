"""The device calls of one GPU session, in order of value, and their budget (standard library only).

    python gpu/device.py --plan        # print it (this module is what it prints)

A lent GPU machine comes with ``BUDGET_S`` of device time in all: its start (``START_S``),
every call, the idle waits between calls and the close count; a gap over 30 s between two calls
loses the machine and everything on it; a call carries at most 64 MiB. So:

1. **Tier 1, one call, no bundle** (the image's torch only, vLLM not installed): the pair
   benchmark, the primitive's profiler trace, the cuda tests that need torch only
   (``gpu/suite.py --tier 1`` through ``gpu/device.py tier1``). If it fails for a reason of
   the machine, it is run once more: the budget keeps room for that rerun.
2. **Tier 2, the bundle** (``gpu/bundle.py``: the stripped vLLM 0.26.0 wheel and the
   dependencies its path imports, in parts of at most 60 MiB): one call per part but the last;
   the last part's call receives it, installs and runs ``e2e``; one more call runs
   ``decode_qwen3_next``.

Each call's ``timeout_s`` covers its steps' limits (``gpu/suite.py``) and, for the install,
``INSTALL_S``; the budget adds, per call, ``GAP_S`` (the tool's round trip and the wait before
the next call) and ``TRANSFER_S`` per 60 MiB carried. ``budget()`` must stay within
``BUDGET_S`` with tier 1 counted twice.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

BUDGET_S = 900  # device time per session, all of it
START_S = 240  # the machine's start, as planned for (it takes minutes)
GAP_S = 15  # per call: the tool's round trip and the next call's start (the machine is lost after 30 s)
TRANSFER_S = 10  # per part carried (60 MiB)
CLOSE_S = 10  # give_back
INSTALL_S = 60  # device.py install: reassemble, check, venv, pip install --no-deps, doctor
RECEIVE_S = 15  # device.py receive: copy one part and check its sha256
MARGIN_S = 5  # per call beyond its steps' limits: python start-up, the suite's bookkeeping
BUNDLE = "out/gpu-bundle"
ASSUMED_PARTS = 3  # without a manifest here: the last bundle built (177 MiB in 60 MiB parts)


@dataclass(frozen=True)
class Call:
    name: str
    tier: int
    command: str
    timeout_s: int
    carry: tuple[str, ...] = ()
    parts_carried: int = 0
    steps: tuple[str, ...] = field(default=())

    def cost_s(self) -> int:
        """Device time this call can take: its limit, the gap after it, its transfer."""
        return self.timeout_s + GAP_S + TRANSFER_S * self.parts_carried


def bundle_parts(bundle_dir: str = os.path.join(ROOT, BUNDLE)) -> tuple[list[str], bool]:
    """The bundle's part names (from its manifest when built here) and whether they are known."""
    path = os.path.join(bundle_dir, "manifest.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            return [p["name"] for p in json.load(fh)["parts"]], True
    return [f"part-{i:02d}" for i in range(ASSUMED_PARTS)], False


def steps_limit(names: tuple[str, ...]) -> int:
    from suite import STEPS

    return sum(STEPS[n].limit_s for n in names)


def calls(parts: list[str]) -> list[Call]:
    """The session's calls in order (tier 1's rerun not listed: ``budget`` counts it)."""
    from suite import TIERS

    tier1 = TIERS[1]
    manifest = f"{BUNDLE}/manifest.json"
    out = [
        Call("tier1", 1, "python3 gpu/device.py tier1", steps_limit(tier1) + MARGIN_S, steps=tier1),
    ]
    for name in parts[:-1]:
        path = f"{BUNDLE}/{name}"
        out.append(Call(f"receive {name}", 2, f"python3 gpu/device.py receive {path}", RECEIVE_S, (path, manifest), 1))
    last = f"{BUNDLE}/{parts[-1]}"
    e2e, decode = ("e2e",), ("decode_qwen3_next",)
    out.append(
        Call(
            f"receive {parts[-1]}, install, e2e", 2,
            f"python3 gpu/device.py receive {last} && python3 gpu/device.py install && "
            f"python3 gpu/device.py suite {' '.join(e2e)}",
            RECEIVE_S + INSTALL_S + steps_limit(e2e) + MARGIN_S, (last, manifest), 1, e2e,
        )
    )
    out.append(
        Call("decode", 2, f"python3 gpu/device.py suite {' '.join(decode)}", steps_limit(decode) + MARGIN_S,
             steps=decode)
    )
    return out


def budget(plan: list[Call]) -> dict:
    """Start + every call + tier 1 once more + close, against ``BUDGET_S``."""
    rerun = sum(c.cost_s() for c in plan if c.tier == 1)
    total = START_S + sum(c.cost_s() for c in plan) + rerun + CLOSE_S
    return {"start_s": START_S, "calls_s": sum(c.cost_s() for c in plan), "tier1_rerun_s": rerun,
            "close_s": CLOSE_S, "total_s": total, "budget_s": BUDGET_S, "spare_s": BUDGET_S - total}


def render(plan: list[Call], known: bool) -> str:
    b = budget(plan)
    lines = [
        f"GPU session plan: {BUDGET_S} s of device time in all; the machine starts in minutes "
        f"(planned {START_S} s); a gap over 30 s between calls loses it; at most 64 MiB carried per call.",
        "Bundle parts: " + (f"from {BUNDLE}/manifest.json." if known
                            else f"{ASSUMED_PARTS} assumed (no manifest here: python gpu/bundle.py)."),
        "",
    ]
    for i, c in enumerate(plan, 1):
        lines.append(f"{i}. tier {c.tier}, {c.name}: "
                     f"run(command={c.command!r}, timeout_s={c.timeout_s}, carry={list(c.carry)})")
        if c.steps:
            lines.append(f"   steps: {', '.join(c.steps)}")
        if c.tier == 1:
            lines.append("   if it fails for a reason of the machine: the same call once more, then go on")
    lines += [
        "",
        f"Budget: start {b['start_s']} + calls {b['calls_s']} (each: timeout_s + {GAP_S} s gap + {TRANSFER_S} s "
        f"per part carried) + tier 1 rerun {b['tier1_rerun_s']} + close {b['close_s']} = {b['total_s']} s "
        f"of {b['budget_s']} s ({b['spare_s']} s spare).",
        "Each call's results come back from $OUT; keep them: python gpu/device.py collect FILES_AT --call NAME",
        "Then give_back (unless the next call follows at once).",
    ]
    return "\n".join(lines)


def main() -> int:
    parts, known = bundle_parts()
    plan = calls(parts)
    print(render(plan, known))
    return 0 if budget(plan)["spare_s"] >= 0 else 1
