"""``vllm-overlap calibrate``: measure on this GPU, keep overlap only where it was faster.

Runs the layer benchmark for the model's per-rank layer shapes and writes a config whose
``min_tokens`` / ``max_tokens`` cover the contiguous run of measured token counts where overlay
on was faster than off by at least ``margin``. A feature with no such run is written disabled.
Without a GPU there is nothing to measure: it says so and exits non-zero, writing nothing.
"""

from __future__ import annotations

import sys

import yaml

from .config import OverlayConfig, load_config_file

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


def main(args) -> int:
    import torch

    if not torch.cuda.is_available():
        print(
            "vllm-overlap calibrate: no CUDA GPU here, so there is nothing to measure; "
            f"no config written (wanted {args.out}).",
            file=sys.stderr,
        )
        return NO_GPU_EXIT
    from .layer_bench import TOKEN_COUNTS, measure_gdn_in_proj

    rows, where = measure_gdn_in_proj(args.model, args.tp, TOKEN_COUNTS, args.reps, "cuda")
    span = choose_range(rows, args.margin)
    config = calibrated_config({"gdn_in_proj": span})
    lines = "\n".join(f"#   {r['tokens']:>5} tokens: on/off {r['on/off']:.3f}" for r in rows)
    header = (
        f"# vllm-overlap calibrate: {args.model}, TP {args.tp}, {where}, margin {args.margin}\n"
        f"# gdn_in_proj region, median of {args.reps} CUDA-graph replays:\n{lines}\n"
    )
    write(config, args.out, header)
    print(header + f"wrote {args.out}: gdn_in_proj " + (f"{span[0]}..{span[1]} tokens" if span else "disabled"))
    return 0
