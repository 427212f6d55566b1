"""gpu/suite.py and its steps, without a GPU: the dry run, the on/off arithmetic, the configs,
and CPU smoke runs of the end-to-end and decode scripts (slow)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from conftest import ROOT, clean_env

sys.path.insert(0, os.path.join(ROOT, "gpu"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import model_configs  # noqa: E402
import model_shapes  # noqa: E402
import suite  # noqa: E402


def run(*args, timeout=900, env=None):
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
        env=clean_env(env),
    )


def test_dry_run_lists_every_step_and_finds_its_inputs(tmp_path):
    proc = run("gpu/suite.py", "--dry-run", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = [ln.split()[0] for ln in proc.stdout.splitlines() if not ln.startswith(" ")]
    assert steps == [
        "pairs", "trace_primitive", "cuda_tests_torch", "e2e", "decode_qwen3_next", "cuda_tests", "profile",
        "decode_deepseek_v32",
    ]
    assert proc.stdout.count("inputs found") == 8
    assert (
        f"VLLM_OVERLAP=0 {sys.executable} gpu/decode.py --kind qwen3-next --layers 4 --concurrency 1 16 "
        f"--steps 32 --repeats 3 --out {tmp_path}/decode_qwen3_next/off.json"
    ) in proc.stdout
    assert not list(tmp_path.iterdir())  # a dry run writes nothing


def test_tiers_in_order_of_value(tmp_path):
    assert suite.TIERS == {
        1: ("pairs", "trace_primitive", "cuda_tests_torch"),
        2: ("e2e", "decode_qwen3_next"),
        3: ("cuda_tests", "profile", "decode_deepseek_v32"),
    }
    assert all(m in ("torch", "pytest", "yaml", "pydantic") for n in suite.TIERS[1] for m in suite.STEPS[n].modules)
    proc = run("gpu/suite.py", "--dry-run", "--tier", "1", "--out", str(tmp_path))
    assert [ln.split()[0] for ln in proc.stdout.splitlines() if not ln.startswith(" ")] == list(suite.TIERS[1])
    pairs = next(ln for ln in proc.stdout.splitlines() if "benchmarks/pairs.py" in ln)
    # every site (one published model per family), bf16 and FP8
    for model in ("Qwen3-Next-80B-A3B", "DeepSeek-V3.2", "MiniCPM3-4B", "OLMo-Hybrid-7B", "Ling-3.0-flash",
                  "Kimi-Linear-48B-A3B"):
        assert model in pairs
    assert "--dtypes bf16 fp8" in pairs
    families = {model_shapes.SITES[s][0] for s in model_shapes.SITES}
    covered = {model_shapes.MODELS[m]["family"] for m in suite.PAIRS_TIER1[1:suite.PAIRS_TIER1.index("--tp")]}
    assert covered == families


def test_dry_run_names_what_is_missing(monkeypatch, capsys):
    step = suite.STEPS["pairs"]
    broken = suite.Step(step.name, step.what, step.limit_s, ("benchmarks/no_such_file.py",), ("no_such_module",), step.commands)
    monkeypatch.setitem(suite.STEPS, "pairs", broken)
    assert suite.main(["pairs", "--dry-run", "--out", "unused"]) == 1
    assert "MISSING benchmarks/no_such_file.py, python module no_such_module" in capsys.readouterr().out


def test_a_failing_or_slow_step_does_not_stop_the_next(tmp_path, monkeypatch):
    py = sys.executable
    steps = {
        "fails": suite.Step("fails", "exits 3", 30, (), (), (("a", [py, "-c", "raise SystemExit(3)"], {}),)),
        "slow": suite.Step("slow", "sleeps", 1, (), (), (("a", [py, "-c", "import time; time.sleep(5)"], {}), ("b", [py, "-c", "0"], {}))),
        "works": suite.Step("works", "writes", 30, (), (), (("a", [py, "-c", "open('{dir}/x', 'w').write('ok')"], {}),)),
    }
    monkeypatch.setattr(suite, "STEPS", steps)
    assert suite.main(["--out", str(tmp_path)]) == 1
    records = {r["step"]: r for r in json.loads((tmp_path / "suite.json").read_text())}
    assert [r["rc"] for r in records["fails"]["runs"]] == [3]
    assert [r["rc"] for r in records["slow"]["runs"]] == ["timeout", "not started: step out of time"]
    assert records["works"]["ok"] and (tmp_path / "works" / "x").read_text() == "ok"


def test_decode_ratios_against_the_mean_off_with_the_off_to_off_noise(tmp_path):
    for label, tok_s in (("off", 100.0), ("on", 105.0), ("off_again", 102.0)):
        rows = [{"concurrency": 1, "tokens_per_s": tok_s, "step_ms": 1000 / tok_s}]
        (tmp_path / f"{label}.json").write_text(json.dumps({"rows": rows}))
    (row,) = suite.decode_ratios(str(tmp_path))
    assert row["on/off"] == round(105 / 101, 4) and row["noise"] == round(2 / 101, 4)
    (tmp_path / "on.json").unlink()
    assert suite.decode_ratios(str(tmp_path)) is None


def test_reduced_configs_keep_the_published_site_shapes():
    """The decode runs and the pair benchmark must measure the same model."""
    pairs_of = {"qwen3-next": "Qwen3-Next-80B-A3B", "deepseek-v32": "DeepSeek-V3.2"}
    for kind, name in pairs_of.items():
        table = model_shapes.MODELS[name]
        config = model_configs.reduced_config(kind, 4)
        shared = [k for k in table if k not in ("source", "family")]
        assert {k: config[k] for k in shared} == {k: table[k] for k in shared}
    qwen = model_configs.reduced_config("qwen3-next", 8)
    assert qwen["num_hidden_layers"] == 8 and qwen["layer_types"].count("full_attention") == 2
    assert qwen["layer_types"][3] == "full_attention" and qwen["layer_types"][0] == "linear_attention"
    assert model_configs.reduced_config("deepseek-v32", 3)["first_k_dense_replace"] == 3


@pytest.mark.slow
def test_e2e_script_cpu_smoke(tmp_path):
    proc = run("gpu/e2e.py", "--smoke", "--out", str(tmp_path), "--jobs", "2", "--max-tokens", "6", "--prompts", "3")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "e2e.json").read_text())["rows"]
    assert [(r["mode"], r["verdict"], r["sequences"], r["tokens"]) for r in rows] == [
        ("eager", "pass", 3, 18),
        ("compiled", "pass", 3, 18),
    ]
    print("\n" + "\n".join(proc.stdout.splitlines()[-3:]))


@pytest.mark.slow
def test_decode_script_cpu_smoke(tmp_path):
    out = tmp_path / "on.json"
    proc = run("gpu/decode.py", "--smoke", "--out", str(out), "--gpu-memory-utilization", "0.2", env={"VLLM_OVERLAP": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [r["concurrency"] for r in result["rows"]] == [1, 2]
    # a step time is the difference of two wall times: on a loaded CPU it can come out
    # negative, so the smoke run checks the numbers are there, not their value
    assert all(math.isfinite(r["step_ms"]) and math.isfinite(r["tokens_per_s"]) for r in result["rows"])
    assert "gdn_in_proj applied (4/4 targets)" in result["summary"]
