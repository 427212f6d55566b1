"""``vllm-overlap calibrate``: measure on this GPU, keep overlap only where it was faster.

Runs the layer benchmark for the model's per-rank layer shapes and writes a config whose
``min_tokens`` / ``max_tokens`` cover the contiguous run of measured token counts where overlay
on was faster than off by at least ``margin``. A feature with no such run is written disabled.
Without a GPU there is nothing to measure: it says so and exits non-zero, writing nothing.
"""

from __future__ import annotations

import sys

import yaml

from vllm_overlap.cli.command import Command
from vllm_overlap.config.loader import OverlayConfig, load_config_file

NO_GPU_EXIT = 3


def choose_range(rows: list[dict], margin: float) -> tuple[int, int] | None:
    """The longest contiguous run of measured token counts with on/off <= 1 - margin."""
    best: list[int] = []
    run: list[int] = []
    for row in sorted(rows, key=lambda r: r["tokens"]):
        if row["on/off"] <= 1.0 - margin:
            run.append(row["tokens"])
            if len(run) > len(best):
                best = list(run)
        else:
            run = []
    if not best:
        return None
    smallest = min(r["tokens"] for r in rows)
    return (1 if best[0] == smallest else best[0], best[-1])


def calibrated_config(ranges: dict[str, tuple[int, int] | None]) -> OverlayConfig:
    data = OverlayConfig().model_dump()
    for feature, span in ranges.items():
        if span is None:
            data["features"][feature]["enabled"] = False
        else:
            data["features"][feature].update(min_tokens=span[0], max_tokens=span[1])
    return OverlayConfig.model_validate(data)


def write(config: OverlayConfig, path: str, header: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(header)
        yaml.safe_dump(config.model_dump(mode="json"), fh, sort_keys=False)
    load_config_file(path)  # what we wrote must load


def plan(results: dict, margin: float, reps: int) -> tuple[dict[str, tuple[int, int] | None], list[str]]:
    """From ``layer_bench.measure_model``'s results (site id -> rows, or why not measured):
    each measured feature's range, and the header lines that show why."""
    from vllm_overlap.sites import SITES

    ranges: dict[str, tuple[int, int] | None] = {}
    lines = []
    for site_id, rows in results.items():
        feature = SITES[site_id].feature
        if isinstance(rows, str):
            lines.append(f"# {site_id} ({feature}): not measured: {rows}")
            continue
        ranges[feature] = choose_range(rows, margin)
        lines.append(f"# {site_id} ({feature}) region, median of {reps} CUDA-graph replays:")
        lines += [f"#   {r['tokens']:>5} tokens: on/off {r['on/off']:.3f}" for r in rows]
    return ranges, lines


def main(args) -> int:
    import torch

    if not torch.cuda.is_available():
        print(
            "vllm-overlap calibrate: no CUDA GPU here, so there is nothing to measure; "
            f"no config written (wanted {args.out}).",
            file=sys.stderr,
        )
        return NO_GPU_EXIT
    from vllm_overlap.testing.layer_bench import TOKEN_COUNTS, measure_model

    results, where = measure_model(args.model, args.tp, TOKEN_COUNTS, args.reps, "cuda")
    ranges, lines = plan(results, args.margin, args.reps)
    if not ranges:
        print(
            f"vllm-overlap calibrate: no site of this overlay could be measured in {args.model}'s "
            f"layers; no config written (wanted {args.out}).\n" + "\n".join(lines),
            file=sys.stderr,
        )
        return 2
    header = (
        f"# vllm-overlap calibrate: {args.model}, TP {args.tp}, {where}, margin {args.margin}\n"
        + "\n".join(lines)
        + "\n"
    )
    write(calibrated_config(ranges), args.out, header)
    kept = ", ".join(
        f"{feature} " + (f"{span[0]}..{span[1]} tokens" if span else "disabled") for feature, span in ranges.items()
    )
    print(header + f"wrote {args.out}: {kept}")
    return 0


def arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="HF id or path of the model to be served")
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel size it will be served at")
    parser.add_argument("--out", default="vllm-overlap.yaml", help="config file to write")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--margin", type=float, default=0.02, help="required speed-up (fraction)")


COMMAND = Command(
    "calibrate", "measure on this GPU and write a config with per-feature token ranges", main, arguments
)
