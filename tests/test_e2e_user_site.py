"""End to end through vllm.LLM on the CPU with a user-declared site: the tiny MiniCPM3 with the
built-in kv_a_proj switched off and the same pair declared in the config's ``sites:``.

Overlay on (op path forced) and off give identical token ids, eager and under torch.compile;
the log names the user site (applied, its census line, its first-run check), and the
compiled run has no graph break and as many graphs as the run without the overlay.
"""

from __future__ import annotations

import pytest
from conftest import minicpm3_user_site_yaml, run_llm

pytestmark = pytest.mark.slow

CONFIG = minicpm3_user_site_yaml("minicpm3_q_kv")
TARGET = "user_minicpm3_q_kv:vllm.model_executor.models.minicpm3.MiniCPM3Attention.forward"


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_user_site_on_off_identical(minicpm3_dir, tmp_path, compiled):
    config = tmp_path / "user.yaml"
    config.write_text(CONFIG)
    flags = ["--compile"] if compiled else []
    on = run_llm(
        minicpm3_dir,
        *flags,
        env={
            "VLLM_OVERLAP": "1",
            "VLLM_OVERLAP_TEST_OP_PATH": "1",
            "VLLM_OVERLAP_CONFIG": str(config),
            "VLLM_CACHE_ROOT": str(tmp_path / "cache-on"),
        },
    )
    off = run_llm(minicpm3_dir, *flags, env={"VLLM_OVERLAP": "0", "VLLM_CACHE_ROOT": str(tmp_path / "cache-off")})
    assert len(off["token_ids"]) == 4 and all(len(t) == 8 for t in off["token_ids"])
    assert on["token_ids"] == off["token_ids"]
    assert on["outcomes"][TARGET] == "applied"
    assert on["outcomes"]["kv_a_proj:vllm.model_executor.models.minicpm3.MiniCPM3Attention.forward"] == "off"
    assert on["sites"] == {
        "user_minicpm3_q_kv": {"feature": "user_minicpm3_q_kv", "mode": "dual_stream", "layers": 2, "overlap": 2, "serial": {}}
    }
    assert "vllm-overlap site user_minicpm3_q_kv: 2 of 2 layers overlap" in on["log"]
    assert "vllm-overlap site user_minicpm3_q_kv: first run checked: no shared memory written, no collective" in on["log"]
    assert "user_minicpm3_q_kv applied (1/1 targets)" in on["summary"]
    if compiled:
        assert on["graph_breaks"] == 0
        assert on["dynamo_unique_graphs"] == off["dynamo_unique_graphs"]
    print(f"\n{'compiled' if compiled else 'eager'} user site on/off identical: {off['token_ids']}")
