"""Smoke runs of the benchmarks on the CPU: they complete, print a table last, save a PNG.

Timings are printed, never asserted (speed is measured in benchmarks, not unit tests).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import clean_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow
PNG = b"\x89PNG\r\n\x1a\n"


def run_script(*args, timeout=900):
    proc = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=clean_env(), cwd=ROOT
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


def test_layer_benchmark_smoke(tmp_path):
    out = run_script("benchmarks/site_regions.py", "--reps", "20", "--out", str(tmp_path))
    png = tmp_path / "layers-gdn_in_proj-cpu.png"
    assert png.read_bytes()[:8] == PNG
    data = json.loads((tmp_path / "layers-gdn_in_proj-cpu.json").read_text())
    assert [r["tokens"] for r in data["rows"]] == [1, 2, 4, 8, 16, 64, 256, 1024, 4096]
    lines = out.rstrip().splitlines()
    assert lines[-11].startswith("tokens") and lines[-1].split()[0] == "4096"  # the table is last
    print("\n" + "\n".join(lines[-14:]))


def test_layer_benchmark_times_the_deepseek_v32_sites(tmp_path, deepseek_v3_dir):
    overrides = '{"index_topk": 16, "index_n_heads": 4, "index_head_dim": 128}'
    out = run_script(
        "benchmarks/site_regions.py", "--model", deepseek_v3_dir, "--hf-overrides", overrides,
        "--tokens", "1,16", "--reps", "6", "--out", str(tmp_path),
    )
    for site in ("deepseek_indexer_v32", "mla_q_b_proj_v32"):
        assert (tmp_path / f"layers-{site}-cpu.png").read_bytes()[:8] == PNG
        data = json.loads((tmp_path / f"layers-{site}-cpu.json").read_text())
        assert data["site"] == site and [r["tokens"] for r in data["rows"]] == [1, 16]
    assert "mla_q_b_proj_legacy: not measured: its current branch is the whole indexer call" in out
    lines = out.rstrip().splitlines()
    assert lines[-4].startswith("tokens") and lines[-1].split()[0] == "16"  # a table is last
    print("\n" + "\n".join(lines[-12:]))


def test_serve_benchmark_smoke(tmp_path):
    out = run_script("benchmarks/serve.py", "--smoke", "--out", str(tmp_path), timeout=1500)
    assert (tmp_path / "serve-cpu-smoke.png").read_bytes()[:8] == PNG
    data = json.loads((tmp_path / "serve-cpu-smoke.json").read_text())
    assert [r["concurrency"] for r in data["rows"]] == [1, 2, 4, 8]
    assert all(r["done"] == f"{2 * r['concurrency']}/{2 * r['concurrency']}" for r in data["rows"])
    assert "server overlay on: vllm-overlap line says applied = True" in out
    assert "server overlay off: vllm-overlap line says applied = False" in out
    lines = out.rstrip().splitlines()
    assert lines[-6].startswith("concurrency") and lines[-1].split()[0] == "8"
    print("\n" + "\n".join(lines[-8:]))
