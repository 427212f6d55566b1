"""vllm-overlap calibrate: the range it keeps, the file it writes, and no GPU, no file."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vllm_overlap.cli.calibrate import NO_GPU_EXIT, calibrated_config, choose_range, write
from vllm_overlap.config.loader import load_config_file


def rows(ratios):
    return [{"tokens": t, "on/off": r} for t, r in ratios]


@pytest.mark.parametrize(
    "ratios, expected",
    [
        ([(1, 0.9), (2, 0.92), (4, 0.95), (8, 1.0), (16, 1.01)], (1, 4)),  # starts at the smallest: from 1
        ([(1, 1.0), (2, 0.9), (4, 0.9), (8, 1.1)], (2, 4)),
        ([(1, 0.9), (2, 1.1), (4, 0.9), (8, 0.9), (16, 0.9)], (4, 16)),  # the longest run wins
        ([(1, 0.99), (2, 0.985)], None),  # within the 2 % margin: not faster
        ([(1, 1.2), (2, 1.3)], None),
    ],
)
def test_choose_range(ratios, expected):
    assert choose_range(rows(ratios), margin=0.02) == expected


def test_written_config_loads_and_carries_the_ranges(tmp_path):
    path = tmp_path / "cal.yaml"
    write(calibrated_config({"gdn_in_proj": (1, 64)}), str(path), "# header\n")
    cfg = load_config_file(str(path))
    assert (cfg.features.gdn_in_proj.min_tokens, cfg.features.gdn_in_proj.max_tokens) == (1, 64)
    write(calibrated_config({"gdn_in_proj": None}), str(path), "")
    assert load_config_file(str(path)).features.gdn_in_proj.enabled is False


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this is the no-GPU path")
def test_without_a_gpu_it_says_so_and_writes_nothing(tmp_path):
    out = tmp_path / "cal.yaml"
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_overlap.cli", "calibrate", "--model", "any/model", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == NO_GPU_EXIT != 0
    assert "no CUDA GPU here" in proc.stderr and not out.exists()
