"""End to end through vllm.LLM on the CPU with a tiny MiniCPM3 (kv_a_proj).

Overlay on (op path forced, and the CPU default) and off must give the same token ids, eager
and under torch.compile; the rewrite must be applied, the census must count both attention
layers as running the site, and the compiled run must have no graph break and as many graphs
as the run without the overlay.
"""

from __future__ import annotations

import pytest
from conftest import doctor_model, run_on_off

pytestmark = pytest.mark.slow

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
    runs = run_on_off(minicpm3_dir, tmp_path, compiled)
    _check_on_run(runs["on"])
    assert "kv_a_proj off" in runs["off"]["summary"]
    print(f"\n{'compiled' if compiled else 'eager'} MiniCPM3 on/off identical: {runs['off']['token_ids']}")


def test_doctor_says_the_model_uses_kv_a_proj(minicpm3_dir):
    report = doctor_model(minicpm3_dir)
    assert report["model_type"] == "minicpm3"
    assert report["rows"]["kv_a_proj"] == "uses it"
    for feature in ("gdn_in_proj", "deepseek_indexer", "mla_q_b_proj", "delta_in_proj"):
        assert report["rows"][feature].startswith("skipped: MiniCPM3ForCausalLM runs none of its sites"), feature
