"""The firewall: nothing the plugin does inside a post-import hook raises into the import.

Each case declares a broken site on a synthetic target module, registers the plugin, and
imports the module in a fresh interpreter, as vLLM imports its model code. The module must
import and run its own code; the site is ``skipped: internal error: <type>: <message>`` in
the state, in the log line and in doctor; with ``strict: true`` start-up stops with one line.
"""

from __future__ import annotations

import json
import textwrap

import pytest
from test_plugin import run_py

TARGET = '''
class Layer:
    def left(self, x):
        return x * 2

    def right(self, x):
        return x + 3

    def forward(self, x):
        a = self.left(x)
        b = self.right(x)
        return a * b
'''
RUNTIME_OK = '''
def broken_post_load(model, features):
    raise ValueError("post-load bug")
'''
RUNTIME_BROKEN = '''
raise RuntimeError("runtime exploded at import")
'''

# How each case breaks the synthetic site (code run before register()), and what the
# reason then says after "internal error: ".
CASES = {
    "newest anchor does not parse": (
        "site(Anchor('a = self.left(x', PAIR.replace))",
        "SyntaxError: ",
    ),
    "older anchor does not parse": (
        "site(PAIR, older=((Anchor('b = = self.right(x)', 'b = 0'),),))",
        "SyntaxError: ",
    ),
    "engine error": (
        "site(PAIR)\n"
        "def boom(*args, **kwargs):\n"
        "    raise ZeroDivisionError('engine bug')\n"
        "rewrite.find_anchor = boom",
        "ZeroDivisionError: engine bug",
    ),
    "runtime fails to import": (
        "site(PAIR, runtime='fw_runtime_broken')",
        "RuntimeError: runtime exploded at import (importing fw_runtime_broken)",
    ),
}

PRELUDE = '''
import dataclasses, json, sys
sys.path.insert(0, {dir!r})
from vllm_overlap.engine import rewrite
from vllm_overlap.sites import FEATURES, SITES
from vllm_overlap.engine.rewrite import Anchor, Target
from vllm_overlap.engine.site import Branch, Form

PAIR = Anchor(
    "a = self.left(x)\\nb = self.right(x)",
    "a, b = __site__.pair(self, x)",
)

def site(*anchors, older=(), runtime=None):
    # gdn_in_proj's config entry, a synthetic site; the other features (and vLLM's modules
    # they would import) stay out of the way
    for name in [n for n in FEATURES if n != "gdn_in_proj"]:
        del FEATURES[name]
    branches = dict(current=Branch("a = self.left(x)", "a"), aux=Branch("b = self.right(x)", "b"))
    synthetic = dataclasses.replace(
        SITES["gdn_in_proj"],
        targets=(Target("fw_target", "Layer.forward"),),
        forms=tuple(Form(tuple(a), **branches) for a in (anchors, *older)),
        entry="pair",
        params=("self", "x"),
        tokens="x",
        dynamo="plain",
        outputs=(),
        modes=(),
    )
    FEATURES["gdn_in_proj"] = dataclasses.replace(
        FEATURES["gdn_in_proj"], sites=(synthetic,), extra_modes=()
    )
    if runtime:
        import vllm_overlap.runtime.plugin as plugin
        plugin.RUNTIME = runtime
'''

IMPORT_AND_REPORT = '''
import vllm_overlap
vllm_overlap.register()
import fw_target
from vllm_overlap import outcomes
from vllm_overlap.engine import rewrite
from vllm_overlap.cli.doctor import collect, doctor_report
outcome = outcomes.outcomes[("gdn_in_proj", "fw_target.Layer.forward")]
report = collect()
print(json.dumps({
    "result": fw_target.Layer().forward(4),
    "untouched": getattr(fw_target.Layer.forward, rewrite.MARKER, None) is None,
    "outcome": outcome.describe(),
    "doctor": [r["result"] for r in report["rows"] if r["module"] == "fw_target"],
    "ok": report["ok"],
}))
print(doctor_report(report))
'''


@pytest.fixture
def synthetic_dir(tmp_path):
    (tmp_path / "fw_target.py").write_text(TARGET)
    (tmp_path / "fw_runtime_ok.py").write_text(RUNTIME_OK)
    (tmp_path / "fw_runtime_broken.py").write_text(RUNTIME_BROKEN)
    return str(tmp_path)


def _program(synthetic_dir: str, breakage: str, tail: str) -> str:
    return PRELUDE.format(dir=synthetic_dir) + textwrap.dedent(breakage) + "\n" + tail


def test_the_synthetic_site_applies_when_nothing_is_broken(synthetic_dir):
    """The control: the same harness with an intact declaration rewrites the target."""
    proc = run_py(_program(synthetic_dir, "site(PAIR)", IMPORT_AND_REPORT))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.splitlines()[0])
    assert report["outcome"] == "applied" and not report["untouched"]
    assert report["result"] == 56


@pytest.mark.parametrize("case", list(CASES))
def test_a_failure_of_ours_is_a_skip_and_the_module_imports(synthetic_dir, case):
    breakage, reason = CASES[case]
    proc = run_py(_program(synthetic_dir, breakage, IMPORT_AND_REPORT))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.splitlines()[0])
    assert report["result"] == 56 and report["untouched"]  # upstream's code, unchanged
    assert report["outcome"].startswith(f"skipped: internal error: {reason}"), report
    assert report["doctor"] == [report["outcome"]] and report["ok"] is False
    table_row = next(ln for ln in proc.stdout.splitlines() if ln.startswith("gdn_in_proj"))
    assert table_row.split()[:3] == ["gdn_in_proj", "Layer.forward", "yes"]
    assert "skipped: internal error: " + reason in table_row
    log = [ln for ln in proc.stderr.splitlines() if "vllm-overlap 0.1.0 [pid" in ln]
    assert log and f"gdn_in_proj skipped forward: internal error: {reason}" in log[0], log
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("case", list(CASES))
def test_strict_stops_start_up_with_one_line(synthetic_dir, case, tmp_path):
    breakage, reason = CASES[case]
    cfg = tmp_path / "strict.yaml"
    cfg.write_text("strict: true\n")
    tail = "import vllm_overlap\nvllm_overlap.register()\nimport fw_target\nprint('still running')\n"
    proc = run_py(_program(synthetic_dir, breakage, tail), env={"VLLM_OVERLAP_CONFIG": str(cfg)})
    assert proc.returncode == 1 and "still running" not in proc.stdout
    ours = [ln for ln in proc.stderr.splitlines() if ln.startswith("vllm-overlap: ")]
    assert len(ours) == 1, proc.stderr
    assert ours[0].startswith(
        "vllm-overlap: strict: true and an enabled feature cannot be applied: gdn_in_proj on "
        f"fw_target.Layer.forward: internal error: {reason}"
    )
    assert "Traceback" not in proc.stderr


def test_a_failing_hook_body_is_logged_not_raised(synthetic_dir):
    """Beyond one site: anything else failing in the hook (here, the announcement) is
    logged as an internal error and the import goes on."""
    breakage = (
        "site(PAIR)\n"
        "import vllm_overlap.runtime.plugin as plugin\n"
        "def broken_announce():\n"
        "    raise KeyError('announce')\n"
        "plugin._announce = broken_announce\n"
    )
    tail = "import vllm_overlap\nvllm_overlap.register()\nimport fw_target\nprint(fw_target.Layer().forward(4))\n"
    proc = run_py(_program(synthetic_dir, breakage, tail))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "56"
    assert "vllm-overlap: internal error: KeyError: 'announce' (in the hook on fw_target)" in proc.stderr


POST_LOAD = '''
FEATURES["gdn_in_proj"] = dataclasses.replace(
    FEATURES["gdn_in_proj"], post_load="fw_runtime_ok:broken_post_load", post_load_modes=("dual_stream",)
)
from vllm.model_executor.model_loader import base_loader, utils
def loader_step(model, *args):  # stands for vLLM's step, which the plugin wraps
    print("vLLM's post-processing ran")
utils.process_weights_after_loading = loader_step
base_loader.process_weights_after_loading = loader_step  # bound by name, as the loaders do
import vllm_overlap
vllm_overlap.register()
import torch
base_loader.process_weights_after_loading(torch.nn.Linear(2, 2), None, None)
print("loaded")
'''


def test_a_failing_post_load_step_is_logged_and_loading_goes_on(synthetic_dir):
    proc = run_py(_program(synthetic_dir, "site(PAIR)", POST_LOAD))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["vLLM's post-processing ran", "loaded"]
    assert (
        "vllm-overlap: internal error: ValueError: post-load bug "
        "(post-load step fw_runtime_ok:broken_post_load)" in proc.stderr
    )


def test_strict_stops_on_a_failing_post_load_step(synthetic_dir, tmp_path):
    cfg = tmp_path / "strict.yaml"
    cfg.write_text("strict: true\n")
    proc = run_py(
        _program(synthetic_dir, "site(PAIR)", POST_LOAD), env={"VLLM_OVERLAP_CONFIG": str(cfg)}
    )
    assert proc.returncode == 1 and "loaded" not in proc.stdout
    ours = [ln for ln in proc.stderr.splitlines() if ln.startswith("vllm-overlap: ")]
    assert ours == [
        "vllm-overlap: strict: true and a post-load step failed: internal error: ValueError: "
        "post-load bug (post-load step fw_runtime_ok:broken_post_load)"
    ], proc.stderr
