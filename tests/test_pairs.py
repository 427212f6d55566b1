"""benchmarks/pairs.py and its shape table, on the CPU (the GPU runs are in gpu/suite.py).

The expected widths below are worked out by hand from each model's published config.json
(the values are in the comments), not read from the table under test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, clean_env

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import model_shapes  # noqa: E402
import pairs  # noqa: E402


def widths(shapes):
    """Per branch, its GEMMs as (name, in, out)."""
    return [
        [(op.name, op.k, op.n) for op in b.ops if isinstance(op, model_shapes.Gemm)]
        for b in shapes.branches
    ]


@pytest.mark.parametrize(
    "model, tp, qkvz, ba, hidden",
    [
        # Qwen3-Next-80B-A3B: hidden 2048, 16 key heads x 128, 32 value heads x 128:
        # qkvz = 2*16*128 + 2*32*128 = 12288, ba = 2*32 = 64
        ("Qwen3-Next-80B-A3B", 1, 12288, 64, 2048),
        ("Qwen3-Next-80B-A3B", 8, 1536, 8, 2048),
        ("Qwen3.5-35B-A3B", 4, 3072, 16, 2048),
        # Qwen3.5-122B-A10B: hidden 3072, 16 key heads, 64 value heads: 4096 + 16384 = 20480
        ("Qwen3.5-122B-A10B", 2, 10240, 64, 3072),
        # Qwen3.5-397B-A17B: hidden 4096, same heads as 122B
        ("Qwen3.5-397B-A17B", 1, 20480, 128, 4096),
    ],
)
def test_gdn_in_proj_per_rank_widths(model, tp, qkvz, ba, hidden):
    shapes = model_shapes.site_shapes("gdn_in_proj", model, tp)
    assert widths(shapes) == [[("in_proj_qkvz", hidden, qkvz)], [("in_proj_ba", hidden, ba)]]
    assert shapes.fused and not model_shapes.replicated(shapes)


def test_deepseek_sites_per_rank_widths():
    # DeepSeek-V3.2: hidden 7168, q_lora 1536, kv_lora 512, rope 64, 128 heads x (128 + 64),
    # indexer 64 heads x 128. A-projection 1536 + 512 + 64 = 2112; wk_weights 128 + 64 = 192;
    # indexer wq_b 64 * 128 = 8192; q_b_proj 128 * 192 / tp.
    v32 = model_shapes.site_shapes("deepseek_indexer", "DeepSeek-V3.2", 8)
    assert widths(v32) == [[("fused_qkv_a_proj", 7168, 2112)], [("indexer.wk_weights_proj", 7168, 192)]]
    assert model_shapes.replicated(v32) and not v32.fused
    legacy = model_shapes.site_shapes("deepseek_indexer_legacy", "DeepSeek-V3.2", 1)
    assert widths(legacy) == [[("indexer.wq_b", 1536, 8192)], [("indexer.wk_weights_proj", 7168, 192)]]
    mla = model_shapes.site_shapes("mla_q_b_proj", "DeepSeek-V3.2", 4)
    assert widths(mla) == [[("indexer.wq_b", 1536, 8192)], [("q_b_proj", 1536, 32 * 192)]]
    bmm = mla.branch1.ops[1]
    assert (bmm.heads, bmm.width, bmm.k, bmm.n) == (32, 192, 128, 512)
    # GLM-5: hidden 6144, q_lora 2048, kv_lora 512, rope 64, 64 heads x (192 + 64), indexer
    # 32 heads x 128: A-projection 2624, wk_weights 160, wq_b 4096, q_b_proj 64 * 256 / tp.
    glm = model_shapes.site_shapes("deepseek_indexer", "GLM-5", 1)
    assert widths(glm) == [[("fused_qkv_a_proj", 6144, 2624)], [("indexer.wk_weights_proj", 6144, 160)]]
    glm_mla = model_shapes.site_shapes("mla_q_b_proj", "GLM-5", 8)
    assert widths(glm_mla) == [[("indexer.wq_b", 2048, 4096)], [("q_b_proj", 2048, 8 * 256)]]


def test_delta_and_kv_a_sites_per_rank_widths():
    # Ling-3.0-flash: hidden 2560, 32 heads x 128. qkvb: q, k, v (heads * 128 each) + beta
    # (one per head); f and g: heads * 128. At tp 2: 16 heads.
    ling = model_shapes.site_shapes("delta_in_proj_bailing_moe_v3", "Ling-3.0-flash", 2)
    assert widths(ling) == [[("qkvb_proj", 2560, 3 * 2048 + 16)], [("f_proj", 2560, 2048)], [("g_proj", 2560, 2048)]]
    # Kimi-Linear: hidden 2304, KDA 32 heads x 128. in_proj: q, k, v and beta sharded, f_a
    # (head_dim) replicated; g_a replicated (2304 -> 128), g_b sharded. At tp 4: 8 heads.
    kda = model_shapes.site_shapes("delta_in_proj_kimi_gdn", "Kimi-Linear-48B-A3B", 4)
    assert widths(kda) == [[("in_proj_qkvgfab", 2304, 3 * 1024 + 8 + 128)], [("g_a_proj", 2304, 128), ("g_b_proj", 128, 1024)]]
    # Kimi-Linear MLA: 32 heads x (128 + 64), kv_lora 512 + rope 64. At tp 8: 4 heads.
    mla = model_shapes.site_shapes("kv_a_proj_kimi_linear", "Kimi-Linear-48B-A3B", 8)
    assert widths(mla) == [[("q_proj", 2304, 4 * 192)], [("kv_a_proj_with_mqa", 2304, 576)]]


def test_a_site_on_the_wrong_family_or_an_indivisible_tp_is_refused():
    with pytest.raises(ValueError, match="has no gdn_in_proj site"):
        model_shapes.site_shapes("gdn_in_proj", "DeepSeek-V3.2", 1)
    with pytest.raises(ValueError, match="not divisible by tensor parallel size 3"):
        model_shapes.site_shapes("gdn_in_proj", "Qwen3-Next-80B-A3B", 3)


def _args(**kw):
    base = dict(sites=list(model_shapes.SITES), models=None, tp=[1, 2, 4, 8], dtypes=["bf16", "fp8"], tokens=[1, 2])
    base.update(kw)
    return argparse.Namespace(**base)


def test_plan_covers_every_site_model_and_tp_and_says_why_fp8_is_left_out_on_a_cpu():
    jobs, skipped = pairs.plan(_args(), torch.device("cpu"))
    keys = {(s.site, s.model, s.tp, dtype) for s, dtype, _ in jobs}
    # 4 Qwen models x 4 tp for gdn_in_proj, 2 DeepSeek models x 4 tp for mla_q_b_proj, the
    # two replicated indexer sites once per model, MiniCPM3-4B (40 heads) x 4 tp and
    # OLMo-Hybrid-7B (30 value heads) at tp 1 and 2, Ling-3.0-flash x 4 tp, Kimi-Linear's two
    # sites x 4 tp: bf16 only on a CPU
    assert len(keys) == 4 * 4 + 2 * 4 + 2 * 2 + 4 + 2 + 4 + 2 * 4
    assert {dtype for *_, dtype in keys} == {"bf16"}
    assert {(site, tp) for site, _, tp, _ in keys if site.startswith("deepseek_indexer")} == {
        ("deepseek_indexer", 1),
        ("deepseek_indexer_legacy", 1),
    }
    indivisible = [s for s in skipped if "not divisible" in s]
    assert indivisible == [
        f"delta_in_proj_olmo_hybrid OLMo-Hybrid-7B tp={tp}: linear_num_value_heads=30 is not "
        f"divisible by tensor parallel size {tp}"
        for tp in (4, 8)
    ]
    fp8 = [s for s in skipped if s not in indivisible]
    assert len(fp8) == len(keys) and all("fp8: FP8 GEMMs need a CUDA GPU" in s for s in fp8)


def test_fp8_is_refused_for_a_gemm_scaled_mm_cannot_take(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    tp8 = model_shapes.site_shapes("gdn_in_proj", "Qwen3-Next-80B-A3B", 8)  # ba: 2048 x 8
    assert pairs.fp8_unsupported(torch.device("cuda"), tp8) == (
        "in_proj_ba is 2048 x 8: _scaled_mm needs multiples of 16"
    )
    tp1 = model_shapes.site_shapes("gdn_in_proj", "Qwen3-Next-80B-A3B", 1)
    assert pairs.fp8_unsupported(torch.device("cuda"), tp1) is None


def test_variants_compute_each_branch_and_the_fused_split():
    shapes = model_shapes.site_shapes("gdn_in_proj", "Qwen3-Next-80B-A3B", 8)
    pair = pairs.Pair(shapes, "bf16", torch.device("cpu"))
    x = pair.inputs(3)
    variants = pair.variants(x)
    assert set(variants) == {"serial", "branch0", "branch1", "fused"}  # no dual without a GPU
    h = x["hidden"]
    serial = variants["serial"]()
    assert torch.equal(serial[0], h @ pair.b0.params[0].T) and torch.equal(serial[1], h @ pair.b1.params[0].T)
    fused = variants["fused"]()
    assert [t.shape for t in fused] == [(3, 1536), (3, 8)] and all(t.is_contiguous() for t in fused)
    assert torch.allclose(fused[0].float(), serial[0].float(), atol=0.05)


def test_a_fan_out_site_has_a_variant_per_branch_and_serial_runs_them_all():
    shapes = model_shapes.site_shapes("delta_in_proj_bailing_moe_v3", "Ling-3.0-flash", 2)
    assert len(shapes.branches) == 3
    pair = pairs.Pair(shapes, "bf16", torch.device("cpu"))
    x = pair.inputs(3)
    variants = pair.variants(x)
    assert set(variants) == {"serial", "branch0", "branch1", "branch2"}  # no dual without a GPU
    h = x["hidden"]
    serial = variants["serial"]()
    assert len(serial) == 3
    for out, runner in zip(serial, pair.runners):
        assert torch.equal(out, h @ runner.params[0].T)
    assert [t.shape[1] for t in serial] == [w for (_, _, w), in widths(shapes)]


def test_mla_branch_runs_q_b_proj_then_the_absorbed_bmm():
    shapes = model_shapes.site_shapes("mla_q_b_proj", "GLM-5", 8)
    pair = pairs.Pair(shapes, "bf16", torch.device("cpu"))
    x = pair.inputs(2)
    q, ql_nope = pair.b1(x["q_c"])
    assert q.shape == (2, 8 * 256) and ql_nope.shape == (8, 2, 512)
    expected = torch.bmm(q.view(2, 8, 256)[..., :192].transpose(0, 1), pair.b1.params[1])
    assert torch.equal(ql_nope, expected)


def test_token_ranges_and_wins():
    assert pairs.ranges([1, 2, 4, 16, 32, 1024]) == "1-4, 16-32, 1024"
    assert pairs.ranges([]) == "none"
    rows = [
        {"site": "s", "model": "m", "tp": 1, "dtype": "bf16", "tokens": t, "dual/serial": r, "noise": 0.02}
        for t, r in ((1, 0.90), (2, 0.97), (4, 0.99), (8, 1.01))
    ]
    (line,) = pairs.wins(rows)
    assert "at tokens 1-2 (best 0.900 at 1)" in line  # 0.99 is within the 2 % noise


@pytest.mark.slow
def test_cpu_smoke_pass(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "pairs.py"), "--out", str(tmp_path)],
        capture_output=True, text=True, env=clean_env(), timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "pairs-cpu-smoke.json").read_text())
    assert {r["site"] for r in data["rows"]} == set(model_shapes.SITES)
    assert all(r["serial_us"] > 0 and "dual_us" not in r for r in data["rows"])
    assert (tmp_path / "pairs-cpu-smoke.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = proc.stdout.rstrip().splitlines()
    assert lines[-len(data["rows"]) - 2].startswith("site") and lines[-1].startswith(list(model_shapes.SITES)[-1])
    print("\n" + "\n".join(lines[-len(data["rows"]) - 2 :]))
