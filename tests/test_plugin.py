"""register(): cheap, idempotent, hooks, the log line, strict mode. Each case in a fresh process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from conftest import clean_env

from vllm_overlap.sites import SITES

SITE_IDS = list(SITES)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GDN = "vllm.model_executor.layers.mamba.gdn.qwen_gdn_linear_attn"

# Replaces gdn_in_proj's anchors by one that matches nothing, as a changed vLLM would.
BREAK_GDN = """
import dataclasses
from vllm_overlap.sites import FEATURES
from vllm_overlap.engine.rewrite import Anchor
f = FEATURES["gdn_in_proj"]
bad = Anchor("x = self.not_upstream(hidden_states)", "x = 1")
FEATURES["gdn_in_proj"] = f.with_anchors(bad)
"""


def run_py(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter, with INFO logging on (vLLM configures its log
    handlers only inside the engine; the engine runs check the line there)."""
    code = "import logging; logging.basicConfig(level=logging.INFO)\n" + textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-c", code],
        env=clean_env(env),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )


def test_register_is_cheap_and_idempotent():
    proc = run_py(
        """
        import sys, vllm_overlap, wrapt
        calls = []
        real = wrapt.register_post_import_hook
        wrapt.register_post_import_hook = lambda hook, name: calls.append(name) or real(hook, name)
        vllm_overlap.register(); vllm_overlap.register()
        heavy = [m for m in ("torch", "vllm", "vllm_overlap.runtime.module_namespaces") if m in sys.modules]
        print("heavy", heavy, "hooks", calls)
        """
    )
    assert proc.returncode == 0, proc.stderr
    from vllm_overlap.runtime.plugin import LOADER_UTILS
    from vllm_overlap.sites import FEATURES

    targets = sorted({m for f in FEATURES.values() for m in f.modules()})
    assert GDN in targets and "vllm.model_executor.layers.mla" in targets
    # one hook for the cache key (vLLM's config module), one for the post-load steps (the
    # DeepSeek features register their layers there), one per target module
    hooks = ["vllm.config.vllm", LOADER_UTILS, *targets]
    assert f"heavy [] hooks {hooks}" in proc.stdout


def test_hook_applies_on_import_and_logs_one_line():
    proc = run_py(
        f"""
        import vllm_overlap
        vllm_overlap.register()
        import {GDN} as m
        vllm_overlap.register()
        from vllm_overlap import outcomes
        mine = {{o.status for o in outcomes.feature_outcomes("gdn_in_proj") if o.target.startswith("{GDN}.")}}
        others = {{o.status for o in outcomes.feature_outcomes("gdn_in_proj") if not o.target.startswith("{GDN}.")}}
        print(sorted(mine), sorted(others))
        """
    )
    assert proc.returncode == 0, proc.stderr
    # the other release's module (0.20/0.21's GatedDeltaNetAttention) is never imported here
    assert "['applied'] ['pending']" in proc.stdout
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "vllm-overlap 0.1.0 [pid" in ln]
    assert len(lines) == 1 and "gdn_in_proj applied (4/4 targets)" in lines[0], lines


def test_all_off_logs_at_register_and_installs_no_hook():
    proc = run_py(
        f"""
        import sys, vllm_overlap
        vllm_overlap.register()
        import {GDN} as m
        from vllm_overlap import outcomes
        print(sorted({{o.status for o in outcomes.outcomes.values()}}), "vllm_overlap.runtime.module_namespaces" in sys.modules)
        """,
        env={"VLLM_OVERLAP": "0"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "['off'] False" in proc.stdout
    assert "config VLLM_OVERLAP=0: gdn_in_proj off" in proc.stdout + proc.stderr


def test_unrecognised_code_is_skipped_with_its_reason():
    proc = run_py(
        BREAK_GDN
        + f"""
import vllm_overlap
vllm_overlap.register()
import {GDN} as m
from vllm_overlap import outcomes
print([o.describe() for o in outcomes.outcomes.values()][0])
"""
    )
    assert proc.returncode == 0, proc.stderr
    assert "skipped: anchor `x = self.not_upstream(hidden_states)` not found, expected 1" in proc.stdout


def test_strict_stops_when_an_enabled_feature_cannot_apply(tmp_path):
    cfg = tmp_path / "strict.yaml"
    cfg.write_text("strict: true\n")
    proc = run_py(
        BREAK_GDN
        + f"""
import vllm_overlap
vllm_overlap.register()
import {GDN}
print("still running")
""",
        env={"VLLM_OVERLAP_CONFIG": str(cfg)},
    )
    assert proc.returncode == 1
    assert "still running" not in proc.stdout
    assert "strict: true and an enabled feature cannot be applied: gdn_in_proj" in proc.stderr
    assert "not found, expected 1" in proc.stderr


def test_bad_config_stops_register_with_one_message(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("features:\n  gdn_in_proj: {mode: warp}\n")
    proc = run_py("import vllm_overlap; vllm_overlap.register()", env={"VLLM_OVERLAP_CONFIG": str(cfg)})
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"vllm-overlap: config {cfg}: features.gdn_in_proj.mode = 'warp': "
        "Input should be 'dual_stream' or 'fused'"
    )


@pytest.mark.parametrize("site_id", SITE_IDS)
def test_every_site_states_its_four_facts(site_id):
    from vllm_overlap.sites import SITES

    facts = SITES[site_id].facts.rows()
    assert set(facts) == {"Why", "How", "Upstream", "Remove when"}
    assert all(len(v.strip()) > 20 for v in facts.values()), facts


def test_unimplemented_mode_is_skipped_not_silently_replaced(tmp_path):
    """A mode the config accepts but a site does not implement is a reason, not a silent
    fall back to the site's dual_stream entry."""
    cfg = tmp_path / "fused.yaml"
    cfg.write_text("features: {gdn_in_proj: {mode: fused}}\n")
    proc = run_py(
        f"""
        import dataclasses
        from vllm_overlap.sites import FEATURES
        f = FEATURES["gdn_in_proj"]
        FEATURES["gdn_in_proj"] = dataclasses.replace(
            f, sites=tuple(dataclasses.replace(s, modes=()) for s in f.sites)
        )
        import vllm_overlap
        vllm_overlap.register()
        import {GDN}
        from vllm_overlap import outcomes
        print({{o.describe() for o in outcomes.feature_outcomes("gdn_in_proj") if o.target.startswith("{GDN}.")}})
        """,
        env={"VLLM_OVERLAP_CONFIG": str(cfg)},
    )
    assert proc.returncode == 0, proc.stderr
    assert (
        '{"skipped: mode \'fused\' is not implemented for site gdn_in_proj in this version"}'
        in proc.stdout
    )


def test_a_runtime_that_fails_to_import_is_a_skip_not_a_broken_vllm_import():
    proc = run_py(
        f"""
        import vllm_overlap.runtime.plugin as plugin
        plugin.RUNTIME = "vllm_overlap.no_such_runtime"
        import vllm_overlap
        vllm_overlap.register()
        import {GDN}
        from vllm_overlap import outcomes
        print({{o.describe() for o in outcomes.outcomes.values()}})
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert (
        "skipped: internal error: ModuleNotFoundError: No module named 'vllm_overlap.no_such_runtime'"
        " (importing vllm_overlap.no_such_runtime)" in proc.stdout
    )


def test_post_load_steps_run_once_per_model_whichever_loader_reaches_vllms_step():
    """vLLM's loaders reach its post-processing through ``model_loader.utils``'s function, some
    through a name bound at import (BaseModelLoader, the weight-cache daemon and IPC loader):
    the steps run before it on every path, once per model."""
    proc = run_py(
        """
        import torch
        from vllm.model_executor.model_loader import base_loader, utils
        from vllm.model_executor.model_loader.weight_cache import daemon, ipc_loader
        import vllm_overlap.runtime.deepseek_post_load as deepseek_census
        import vllm_overlap.runtime.census as site_census
        seen = []
        site_census.post_load = lambda model: seen.append("census")
        deepseek_census.post_load = lambda model, features: seen.append("deepseek")
        callers = {"utils": utils, "base_loader": base_loader, "daemon": daemon, "ipc_loader": ipc_loader}
        for name, module in callers.items():  # as vLLM has them: one function, bound by name
            assert module.process_weights_after_loading is utils.process_weights_after_loading, name
        def vllm_step(model, model_config, target_device):  # stands for vLLM's function
            seen.append("vllm")
        for module in callers.values():
            module.process_weights_after_loading = vllm_step
        import vllm_overlap
        vllm_overlap.register()
        models = [torch.nn.Linear(2, 2) for _ in callers]
        for model, (name, module) in zip(models, callers.items()):
            assert module.process_weights_after_loading.__wrapped__ is vllm_step, name
            seen.append(name)
            for again in range(2):  # a loader may run it twice (the IPC loader does)
                module.process_weights_after_loading(model, None, None)
        print(seen)
        """
    )
    assert proc.returncode == 0, proc.stderr
    per_model = ["census", "deepseek", "vllm", "vllm"]
    expected = [x for name in ("utils", "base_loader", "daemon", "ipc_loader") for x in [name, *per_model]]
    assert str(expected) in proc.stdout, proc.stdout + proc.stderr[-2000:]
