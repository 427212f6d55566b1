"""One way in: every hook and wrapper the package installs goes through ``vllm_overlap.runtime.hooks``,
nothing of ours raises into vLLM through one, ``register()`` raises only its documented stops,
and every vLLM name the package wraps is declared in ``vllm_names``."""

from __future__ import annotations

import ast
import json
import os

import pytest
from test_plugin import run_py

from vllm_overlap.runtime import hooks, vllm_names

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "vllm_overlap")
THE_WAY_IN = os.path.join("vllm_overlap", "runtime", "hooks.py")


def wrapt_uses(root: str) -> list[str]:
    """``path:line`` of every use of wrapt in the Python files under ``root`` (an import of it,
    an attribute of it, or its name as a string handed to an import function), except in
    ``vllm_overlap/runtime/hooks.py``."""
    found = []
    for folder, _, files in os.walk(root):
        for name in sorted(files):
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, os.path.dirname(root))
            if not name.endswith(".py") or rel == THE_WAY_IN:
                continue
            tree = ast.parse(open(path, encoding="utf-8").read(), path)
            for node in ast.walk(tree):
                hit = (
                    (isinstance(node, ast.Import) and any(a.name.split(".")[0] == "wrapt" for a in node.names))
                    or (isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "wrapt")
                    or (isinstance(node, ast.Name) and node.id == "wrapt")
                    or (isinstance(node, ast.Call) and any(
                        isinstance(a, ast.Constant) and a.value == "wrapt" for a in node.args))
                )
                if hit:
                    found.append(f"{rel}:{node.lineno}")
    return found


def test_no_wrapt_outside_the_one_firewalled_helper():
    assert wrapt_uses(PACKAGE) == []


@pytest.mark.parametrize(
    "code",
    [
        "import wrapt\nwrapt.register_post_import_hook(lambda m: None, 'vllm.config.vllm')\n",
        "from wrapt import wrap_function_wrapper\n",
        "import importlib\nw = importlib.import_module('wrapt')\n",
    ],
    ids=["hook", "from-import", "import_module"],
)
def test_an_unfirewalled_hook_added_by_a_future_change_fails_the_check(tmp_path, code):
    """The check above, on a copy of the package with one more module that hooks vLLM
    directly (as cache_key.py did before vLLM 0.34 broke it)."""
    import shutil

    copy = tmp_path / "vllm_overlap"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert wrapt_uses(str(copy)) == []
    (copy / "new_feature_hook.py").write_text(code)
    found = wrapt_uses(str(copy))
    assert found and all(f.startswith("vllm_overlap/new_feature_hook.py:") for f in found)


def test_a_wrapper_failing_in_our_step_returns_vllms_result_and_logs():
    class Config:
        def compute_hash(self):
            return "vllm-hash"

        def boom(self):
            raise ValueError("vLLM's own error")

    def broken(result, instance, args, kwargs):
        raise KeyError("ours")

    before = len(hooks.failures)
    assert hooks.wrap(Config, "compute_hash", after=broken, what="a test wrapper")
    assert hooks.wrap(Config, "boom", after=lambda r, *a: r, what="a test wrapper")
    assert Config().compute_hash() == "vllm-hash"
    assert hooks.failures[before:] == ["internal error: KeyError: 'ours' (a test wrapper)"]
    with pytest.raises(ValueError, match="vLLM's own error"):  # vLLM's exceptions pass unchanged
        Config().boom()
    assert hooks.is_ours(vars(Config)["compute_hash"])
    assert hooks.wrap(Config, "compute_hash", after=broken, what="again")  # once: already ours
    assert not hooks.wrap(Config, "no_such_method", after=broken, what="a release without it")


SYNTHETIC_CONFIG = {
    "neither": "class VllmConfig:\n    pass\n",
    "compute_hash": "class VllmConfig:\n    def compute_hash(self):\n        return 'abcdef0123456789'\n",
    "compile_factors": "class VllmConfig:\n    def compile_factors(self, include_version=True):\n        return {'model': {'x': 1}}\n",
}


def _synthetic_vllm(tmp_path, config_source: str) -> str:
    """A ``vllm`` package with only ``vllm.config.vllm`` (as ``config_source``), first on the path."""
    root = tmp_path / "synthetic"
    (root / "vllm" / "config").mkdir(parents=True)
    (root / "vllm" / "__init__.py").write_text("")
    (root / "vllm" / "config" / "__init__.py").write_text("")
    (root / "vllm" / "config" / "vllm.py").write_text(config_source)
    return str(root)


@pytest.mark.parametrize("form", list(SYNTHETIC_CONFIG))
def test_vllm_config_without_compute_hash_imports_with_every_feature_on(tmp_path, form):
    """The 0.34 break, and the forms before and after it: vLLM's import succeeds with the
    default config (every feature on); the key goes where vLLM keys its cache; where there is
    no such method, the log line and doctor say so and an op site is skipped with the reason."""
    path = _synthetic_vllm(tmp_path, SYNTHETIC_CONFIG[form])
    proc = run_py(
        """
        import json, vllm_overlap
        vllm_overlap.register()
        import vllm.config.vllm as cv
        from vllm_overlap.runtime import cache_key, hooks, plugin
        from vllm_overlap.cli import doctor as cli
        from vllm_overlap.sites import SITES
        config = cv.VllmConfig()
        out = {"describe": cache_key.describe(), "failures": hooks.failures, "line": plugin.summary_line(),
               "op_site": cache_key.unkeyed_reason()}
        out["hash"] = config.compute_hash() if hasattr(config, "compute_hash") else None
        out["factors"] = config.compile_factors() if hasattr(config, "compile_factors") else None
        out["doctor"] = cli.doctor_report(cli.collect())
        print(json.dumps(out))
        """,
        env={"PYTHONPATH": os.pathsep.join([path, ROOT])},
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["failures"] == []
    if form == "neither":
        assert out["describe"].startswith("no compile-cache key: this vLLM's VllmConfig has none of compute_hash, compile_factors")
        assert out["op_site"] == out["describe"]
        assert "compile-cache key: no compile-cache key" in out["line"]
        assert f"compile-cache key: {out['describe']}" in out["doctor"]
    elif form == "compute_hash":
        assert out["describe"] == "mixed into VllmConfig.compute_hash()" and out["op_site"] is None
        assert out["hash"] != "abcdef0123456789" and len(out["hash"]) == 16
    else:
        assert out["describe"] == "mixed into VllmConfig.compile_factors()" and out["op_site"] is None
        assert out["factors"]["model"] == {"x": 1} and json.loads(out["factors"]["vllm_overlap"])["gdn_in_proj"] == "dual_stream"


def test_an_unkeyed_vllm_skips_every_site_whose_traced_code_differs(monkeypatch):
    """With no method to key the compile cache by, an op site (and any mode other than
    dual_stream) is skipped with that reason before anything is rewritten: a stale graph would
    be silent wrong code. A plain site's traced code is upstream's statements: it needs no key."""
    from vllm_overlap import outcomes
    from vllm_overlap.config import active as active_config
    from vllm_overlap.runtime import cache_key, plugin
    from vllm_overlap.sites import FEATURES, SITES

    monkeypatch.setattr(active_config, "_loaded", None)  # the built-in defaults: every feature on
    monkeypatch.setattr(cache_key, "_key", '{"gdn_in_proj": "dual_stream"}')
    monkeypatch.setattr(cache_key, "_keyed_by", [])
    feature = FEATURES["gdn_in_proj"]
    site = feature.sites[0]
    rewrite = next(r for r in feature.rewrites if r.target.qualname.endswith("forward_cpu"))
    out = plugin.apply_rewrite(feature, site, rewrite)
    assert out.status == outcomes.SKIPPED
    assert out.reason.startswith("no compile-cache key: this vLLM's VllmConfig has none of compute_hash, compile_factors")
    assert site.traced_differs()
    plain = [s for s in SITES.values() if s.dynamo == "plain"]
    assert plain and not any(s.traced_differs() for s in plain)
    assert all(s.traced_differs("fused") for s in plain)
    assert all(s.traced_differs() for s in SITES.values() if s.dynamo == "op")


def test_register_raises_only_its_documented_stops(tmp_path):
    """A failure of ours inside register() (here: the cache-key step) is logged, recorded for
    doctor, and vLLM goes on; a bad config is still one line and exit 1."""
    proc = run_py(
        """
        from vllm_overlap.runtime import cache_key, plugin
        def broken(config):
            raise RuntimeError("cache key exploded")
        cache_key.install = broken
        import vllm_overlap
        vllm_overlap.register()
        print("vLLM goes on", plugin.REGISTER_FAILED)
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert "vLLM goes on ['internal error: RuntimeError: cache key exploded (register())']" in proc.stdout
    assert "vllm-overlap: internal error: RuntimeError: cache key exploded (register())" in proc.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("features: {gdn_in_proj: {max_tokens: many}}\n")
    proc = run_py("import vllm_overlap\nvllm_overlap.register()\n", env={"VLLM_OVERLAP_CONFIG": str(bad)})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert [ln for ln in proc.stderr.splitlines() if ln.startswith("vllm-overlap: config ")]


def test_every_name_the_package_wraps_is_declared(tmp_path):
    """Register with every feature on, import every hooked module of the installed vLLM: each
    wrapped vLLM callable is in vllm_names, or is the constructor of a declared site's target
    class (registry sites register their layers as they are built)."""
    proc = run_py(
        """
        import importlib, json
        import vllm_overlap
        vllm_overlap.register()
        from vllm_overlap.runtime import hooks
        for module in list(hooks.hooked):
            try:
                importlib.import_module(module)
            except Exception:
                pass
        import vllm.model_executor.model_loader.utils
        print(json.dumps({"hooked": hooks.hooked, "wrapped": hooks.wrapped}))
        """
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    from vllm_overlap.sites import SITES

    target_classes = {(t.module, t.qualname.rsplit(".", 1)[0]) for s in SITES.values() for t in s.targets}
    wrapped = [tuple(w) for w in out["wrapped"]]
    assert ("vllm.config.vllm", "VllmConfig.compute_hash") in wrapped  # the scan saw the key
    assert ("vllm.model_executor.model_loader.utils", "process_weights_after_loading") in wrapped
    undeclared = [
        (module, name) for module, name in wrapped
        if not vllm_names.listed(module, name)
        and not (name.endswith(".__init__") and (module, name.rsplit(".", 1)[0]) in target_classes)
    ]
    assert undeclared == []
