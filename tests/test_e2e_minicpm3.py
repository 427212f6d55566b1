"""End to end through vllm.LLM on the CPU with a tiny MiniCPM3 (kv_a_proj).

Overlay on (op path forced, and the CPU default) and off must give the same token ids, eager
and under torch.compile; the rewrite must be applied, the census must count both attention
layers as running the site, and the compiled run must have no graph break and as many graphs
as the run without the overlay.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import clean_env, run_llm

pytestmark = pytest.mark.slow

OFF = {"VLLM_OVERLAP": "0"}
ON = {"VLLM_OVERLAP": "1", "VLLM_OVERLAP_TEST_OP_PATH": "1"}
ON_DEFAULT = {"VLLM_OVERLAP": "1", "VLLM_OVERLAP_TEST_OP_PATH": "0"}
TARGET = "kv_a_proj:vllm.model_executor.models.minicpm3.MiniCPM3Attention.forward"


def _check_on_run(run: dict) -> None:
    assert run["outcomes"][TARGET] == "applied"
    assert not [o for o in run["outcomes"].values() if o.startswith("skipped")], run["outcomes"]
    # tiny_models.minicpm3_config: 2 decoder layers, each a MiniCPM3Attention
    assert run["sites"] == {
        "kv_a_proj_minicpm3": {"feature": "kv_a_proj", "mode": "dual_stream", "layers": 2, "overlap": 2, "serial": {}}
    }
    assert "vllm-overlap site kv_a_proj_minicpm3: 2 of 2 layers overlap" in run["log"]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_on_off_identical(minicpm3_dir, tmp_path, compiled):
    flags = ["--compile"] if compiled else []
    runs = {}
    for name, env in (("on", ON), ("on_default", ON_DEFAULT), ("off", OFF)):
        if compiled and name == "on_default":
            continue
        runs[name] = run_llm(minicpm3_dir, *flags, env={**env, "VLLM_CACHE_ROOT": str(tmp_path / f"cache-{name}")})
    tokens = runs["off"]["token_ids"]
    assert len(tokens) == 4 and all(len(t) == 8 for t in tokens)
    for name, run in runs.items():
        assert run["token_ids"] == tokens, name
    _check_on_run(runs["on"])
    assert "kv_a_proj off" in runs["off"]["summary"]
    if compiled:
        assert runs["on"]["graph_breaks"] == 0
        assert runs["on"]["dynamo_unique_graphs"] == runs["off"]["dynamo_unique_graphs"]
    print(f"\n{'compiled' if compiled else 'eager'} MiniCPM3 on/off identical: {tokens}")


def test_doctor_says_the_model_uses_kv_a_proj(minicpm3_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_overlap.cli", "doctor", "--json", "--model", minicpm3_dir],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    model = {r["feature"]: r["this model"] for r in report["model"]["rows"]}
    assert report["model"]["model_type"] == "minicpm3"
    assert model["kv_a_proj"] == "uses it"
    for feature in ("gdn_in_proj", "deepseek_indexer", "mla_q_b_proj"):
        assert model[feature].startswith("skipped: "), model[feature]
