"""Source-level rewrites: patches/ diffs, diff = what runs, and the release matrix."""

from __future__ import annotations

import inspect
import os
import textwrap
import zipfile

import pytest
from conftest import GDN_MODULE

from vllm_overlap.cli.compat import matrix, matrix_table
from vllm_overlap.cli.patch_diffs import installed_vllm, render
from vllm_overlap.engine import rewrite
from vllm_overlap.engine.sources import find_function, read_installed, rewrite_module_text
from vllm_overlap.sites import FEATURES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name", list(FEATURES))
def test_patches_dir_matches_the_installed_vllm(name):
    path = os.path.join(ROOT, "patches", f"{name}.diff")
    committed = open(path, encoding="utf-8").read()
    if installed_vllm() not in committed.splitlines()[0]:
        pytest.skip(f"{path} was made against another vLLM than {installed_vllm()}")
    assert render(FEATURES[name]) == committed, (
        f"{path} drifted from the installed vLLM: regenerate with "
        "`python -m vllm_overlap.cli.patch_diffs patches` and review the change"
    )


def test_diff_shows_exactly_the_code_that_runs(overlay_applied):
    import ast
    import importlib.util

    feature = FEATURES["gdn_in_proj"]
    installed = [m for m in feature.modules() if importlib.util.find_spec(m) is not None]
    assert GDN_MODULE in installed  # (the others are other releases' modules)
    for module in installed:
        new_text, results = rewrite_module_text(read_installed(module), feature.rewrites_in(module))
        tree = ast.parse(new_text)
        lines = new_text.splitlines(keepends=True)
        for rw in feature.rewrites_in(module):
            assert results[rw.target.qualname] == "applies"
            node = find_function(tree, rw.target.qualname)
            from_diff = textwrap.dedent("".join(lines[node.lineno - 1 : node.end_lineno]))
            running = rewrite.installed_rewrites(rw.target)[-1].source
            assert from_diff == running
            assert running in inspect.getsource(getattr(__import__(module, fromlist=["x"]).QwenGatedDeltaNetAttention, rw.target.qualname.split(".")[1]))


def _fake_wheel(tmp_path, release, body):
    """A wheel holding only the GDN module, with ``body`` as the forward_cuda body."""
    directory = tmp_path / "wheels"
    directory.mkdir(exist_ok=True)
    path = directory / f"vllm-{release}-cp38-abi3-manylinux_2_28_x86_64.whl"
    source = (
        "class QwenGatedDeltaNetAttention:\n"
        "    def forward_cuda(self, hidden_states):\n" + textwrap.indent(textwrap.dedent(body), " " * 8)
    )
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("vllm/model_executor/layers/mamba/gdn/qwen_gdn_linear_attn.py", source)
    return str(directory)


def test_compat_matrix_from_wheels_without_importing_them(tmp_path):
    good = """
        mixed_qkvz, _ = self.in_proj_qkvz(hidden_states)
        ba, _ = self.in_proj_ba(hidden_states)
        return mixed_qkvz, ba
    """
    moved = """
        ba, _ = self.in_proj_ba(hidden_states)
        mixed_qkvz, _ = self.in_proj_qkvz(hidden_states)
        return mixed_qkvz, ba
    """
    _fake_wheel(tmp_path, "9.0.0", good)
    directory = _fake_wheel(tmp_path, "9.1.0", moved)
    rows = matrix(["9.0.0", "9.1.0"], directory)
    cell = {(r["release"], r["target"]): r["result"] for r in rows}
    assert cell["9.0.0", "QwenGatedDeltaNetAttention.forward_cuda"] == "applies"
    assert cell["9.1.0", "QwenGatedDeltaNetAttention.forward_cuda"].startswith("skipped: anchor")
    # a method or module the release does not have: another release's shape, not a failure
    assert cell["9.0.0", "QwenGatedDeltaNetAttention.forward_cpu"] == "absent"
    assert cell["9.0.0", "GatedDeltaNetAttention.forward_cuda"] == "absent"
    table = matrix_table(rows, markdown=True).splitlines()
    assert table[0] == "| site | target | 9.0.0 | 9.1.0 |"
    assert "| gdn_in_proj | gdn.qwen_gdn_linear_attn:QwenGatedDeltaNetAttention.forward_cpu | - | - |" in table
    by_site = matrix_table(rows, markdown=True, by_site=True).splitlines()
    assert by_site[0] == "| site | 9.0.0 | 9.1.0 |"
    gdn = next(line for line in by_site if line.startswith("| gdn_in_proj |"))
    assert gdn.startswith("| gdn_in_proj | applies | forward_cuda skipped: anchor")
    # a release with none of a site's targets
    assert "| deepseek_indexer_v32 | - | - |" in by_site


def test_compat_and_diff_report_a_broken_declaration_as_skipped(tmp_path, monkeypatch, capsys):
    """An anchor of ours that does not parse is that site's reason, not a crash."""
    from vllm_overlap import cli
    from vllm_overlap.engine.rewrite import Anchor

    gdn = FEATURES["gdn_in_proj"]
    unparsable = Anchor("mixed_qkvz, _ = self.in_proj_qkvz(", "pass")
    broken = gdn.with_anchors(unparsable)
    monkeypatch.setitem(FEATURES, "gdn_in_proj", broken)
    body = """
        mixed_qkvz, _ = self.in_proj_qkvz(hidden_states)
        ba, _ = self.in_proj_ba(hidden_states)
        return mixed_qkvz, ba
    """
    rows = matrix(["9.0.0"], _fake_wheel(tmp_path, "9.0.0", body))
    cell = {(r["feature"], r["target"]): r["result"] for r in rows}
    assert cell["gdn_in_proj", "QwenGatedDeltaNetAttention.forward_cuda"].startswith(
        "skipped: internal error: SyntaxError: "
    )

    assert cli.main(["diff", "gdn_in_proj"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 4 and all(
        line.startswith("# gdn_in_proj: vllm.model_executor.layers.mamba.gdn.qwen_gdn_linear_attn.")
        and " skipped: internal error: SyntaxError: " in line
        for line in err
    ), err


def test_compat_says_upstream_where_vllm_forks_the_pair_itself(tmp_path):
    """vLLM 0.34's forward_cuda shape: the anchors no longer match because upstream forks the
    same pair through its own primitive; compat says ``upstream``, never ``applies`` for the
    site, and a fork of other projections is still ``skipped``."""
    native = """
        if self._ba_stream is None:
            mixed_qkvz, _ = self.in_proj_qkvz(qkvz_in)
            ba, _ = self.in_proj_ba(hidden_states)
        else:
            mixed_qkvz, (ba,) = execute_in_parallel(
                lambda: self.in_proj_qkvz(qkvz_in)[0],
                [lambda: self.in_proj_ba(hidden_states)[0]],
                start, [done], [self._ba_stream], enable=True,
            )
        return mixed_qkvz, ba
    """
    other = native.replace("[lambda: self.in_proj_ba(hidden_states)[0]]", "[lambda: self.out_proj(hidden_states)[0]]")
    _fake_wheel(tmp_path, "9.2.0", native)
    directory = _fake_wheel(tmp_path, "9.3.0", other)
    rows = matrix(["9.2.0", "9.3.0"], directory)
    cell = {(r["release"], r["target"]): r["result"] for r in rows}
    assert cell["9.2.0", "QwenGatedDeltaNetAttention.forward_cuda"] == (
        "upstream: vLLM forks in_proj_qkvz beside in_proj_ba itself (execute_in_parallel)"
    )
    assert cell["9.3.0", "QwenGatedDeltaNetAttention.forward_cuda"].startswith("skipped: anchor")
    by_site = matrix_table(rows, markdown=True, by_site=True).splitlines()
    gdn = next(line for line in by_site if line.startswith("| gdn_in_proj |"))
    assert gdn.startswith("| gdn_in_proj | forward_cuda upstream: vLLM forks")
    assert "| applies |" not in gdn
