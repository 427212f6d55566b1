"""End to end through vllm.LLM on the CPU with a tiny DeepSeek-V3 (MLA, no indexer).

DeepSeek-V3.2 itself cannot run on the CPU ("Sparse Attention is not supported on CPU"), so
this is the DeepSeek model that can: it runs the legacy MLA wrapper that mla_q_b_proj
rewrites, and its layers have no indexer. Overlay on and off must give the same tokens, the
rewrite must be applied, and the only reason anything stays serial must be "no indexer".
"""

from __future__ import annotations

import pytest
from conftest import doctor_model, run_on_off

pytestmark = pytest.mark.slow

NO_INDEXER = "no indexer"


def _check_on_run(run: dict) -> None:
    outcomes = run["outcomes"]
    assert outcomes["mla_q_b_proj:vllm.model_executor.layers.mla.MultiHeadLatentAttentionWrapper.forward"] == "applied"
    assert outcomes["deepseek_indexer:vllm.model_executor.models.deepseek_v2.Indexer.forward"] == "applied"
    assert not [o for o in outcomes.values() if o.startswith("skipped")], outcomes
    for feature in ("deepseek_indexer", "mla_q_b_proj"):
        report = run["post_load"][feature]
        # tiny_models.deepseek_v3_config: 2 decoder layers, each with MLA attention
        assert report["mla_layers"] == 2 and report["with_indexer"] == 0
        assert report["serial"] == {NO_INDEXER: 2}, report
    assert "0 of 2 MLA layers have an indexer to overlap with; 2 run upstream's statements: no indexer" in run["log"]
    # the site census: the two MLA wrappers run the legacy mla_q_b_proj site, serially (no
    # indexer: upstream's condition is false); no layer runs the indexer sites
    inactive = "inactive: not (self.indexer and self.is_sparse and not self.skip_topk)"
    assert run["sites"] == {
        "mla_q_b_proj_legacy": {
            "feature": "mla_q_b_proj", "mode": "dual_stream", "layers": 2, "overlap": 0, "serial": {inactive: 2}
        }
    }
    assert f"vllm-overlap site mla_q_b_proj_legacy: 0 of 2 layers overlap (serial: 2 {inactive})" in run["log"]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_on_off_identical(deepseek_v3_dir, tmp_path, compiled):
    runs = run_on_off(deepseek_v3_dir, tmp_path, compiled)
    _check_on_run(runs["on"])
    assert "mla_q_b_proj off" in runs["off"]["summary"]
    assert "deepseek_indexer off" in runs["off"]["summary"]
    print(f"\n{'compiled' if compiled else 'eager'} DeepSeek-V3 on/off identical: {runs['off']['token_ids']}")


def test_doctor_says_the_model_has_no_indexer(deepseek_v3_dir):
    report = doctor_model(deepseek_v3_dir)
    assert report["code"]["mla_q_b_proj", "MultiHeadLatentAttentionWrapper.forward"] == "applied"
    assert report["code"]["deepseek_indexer", "Indexer.forward"] == "applied"
    assert report["model_type"] == "deepseek_v3"
    for feature in ("deepseek_indexer", "mla_q_b_proj"):
        assert report["rows"][feature].startswith(f"skipped: {NO_INDEXER}:"), report["rows"][feature]
