"""The release canary (``vllm_overlap.cli.release_canary``): every config registered against each
release's real sources, every hooked module imported, doctor's rows checked against compat.
The slow test runs it per release; the fast ones prove its classifier, its verdicts and its
unpacking on synthetic inputs."""

from __future__ import annotations

import os
import sys
import textwrap
import zipfile

import pytest

from vllm_overlap.cli import release_canary as canary
from vllm_overlap.sites import FEATURES

SITE_MODULES = {m for f in FEATURES.values() for m in f.modules()}


@pytest.mark.slow
@pytest.mark.parametrize("release", canary.RELEASES)
def test_release_canary(release):
    try:
        wheel = canary.wheel(release)
        canary.extra_deps()
    except canary.RegistryUnreachable as exc:
        pytest.skip(str(exc))
    report = canary.run_release(release, wheel)
    print(report.text())
    assert not report.failures, report.text()
    # Not vacuous: every config ran, registered, and imported vLLM's config and a site's module.
    runs = {run["config"]: run for run in report.runs}
    assert sorted(runs) == sorted(os.path.basename(c) for c in canary.config_files())
    for name, run in runs.items():
        assert run["register"] == canary.OK and run["outcomes"], name
        assert run["log_lines"] > 0, f"{name}: the overlay's log was not seen"
        kinds = {i["module"]: i["kind"] for i in run["imports"]}
        assert kinds["vllm.config.vllm"] == canary.OK, name
        assert any(kinds.get(m) == canary.OK for m in SITE_MODULES), name
    assert report.compared > 0


# -- the classifier, on a synthetic package tree ---------------------------------------------


@pytest.fixture
def tree(tmp_path, monkeypatch):
    """``ovl_<n>`` (stands for the overlay's package) and ``upst_<n>`` (for vLLM) on a temp path."""
    tag = tmp_path.name.replace("-", "_")
    ovl, upst = f"ovl_{tag}", f"upst_{tag}"
    files = {
        f"{ovl}/__init__.py": "",
        f"{ovl}/hook.py": "def boom():\n    raise RuntimeError('a bug of ours')\n",
        f"{ovl}/stop.py": (
            "from vllm_overlap.config.loader import OverlayStop\n"
            "def stop():\n    raise OverlayStop('strict: true and a site did not apply')\n"
        ),
        f"{upst}/__init__.py": "",
        f"{upst}/fine.py": "X = 1\n",
        f"{upst}/own.py": "raise ImportError('libcudart.so.13: cannot open shared object file')\n",
        f"{upst}/needs_dep.py": "import not_installed_dependency_xyz\n",
        f"{upst}/calls_ours.py": f"import {ovl}.hook\n{ovl}.hook.boom()\n",
        f"{upst}/stopped.py": f"import {ovl}.stop\n{ovl}.stop.stop()\n",
        f"{upst}/real_overlay.py": (
            "from vllm_overlap.cli.compat import wheel_reader\nwheel_reader('/nonexistent/vllm.whl')\n"
        ),
    }
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield str(tmp_path / ovl), upst
    for name in [m for m in sys.modules if m.startswith((ovl, upst))]:
        del sys.modules[name]


@pytest.mark.parametrize(
    "module, kind",
    [
        ("fine", canary.OK),
        ("own", canary.VLLM),  # vLLM's own extension does not load: reported as vLLM's
        ("needs_dep", canary.VLLM),  # a dependency missing is not the module being absent
        ("missing", canary.ABSENT),
        ("gone.sub", canary.ABSENT),  # its package is not in this release either
        ("calls_ours", canary.OVERLAY),
        ("stopped", canary.STOPPED),
    ],
)
def test_classifier_tells_the_overlay_from_vllm(tree, module, kind):
    ovl_dir, upst = tree
    result = canary.import_and_classify(f"{upst}.{module}", package_dir=ovl_dir)
    assert result["kind"] == kind, result
    if kind == canary.OVERLAY:
        assert "hook.py" in result["detail"] and "a bug of ours" in result["detail"]


def test_classifier_ignores_its_own_frame_in_the_real_package(tree):
    """With the real package: the canary's own frame (which caught the exception, inside
    vllm_overlap) does not make vLLM's failure the overlay's; a real overlay frame does."""
    _, upst = tree
    assert canary.import_and_classify(f"{upst}.own")["kind"] == canary.VLLM
    result = canary.import_and_classify(f"{upst}.real_overlay")
    assert result["kind"] == canary.OVERLAY and "compat.py" in result["detail"], result


# -- the verdicts ------------------------------------------------------------------------------

TARGET = "vllm.m.C.forward"


def _run(status, imported=canary.OK, enabled=True, **extra):
    return {
        "config": "c.yaml",
        "register": canary.OK,
        "features": {"f": {"enabled": enabled, "mode": "dual_stream"}},
        "strict": False,
        "imports": [{"module": "vllm.m", "kind": imported, "detail": "", "seconds": 0}],
        "outcomes": [{"feature": "f", "target": TARGET, "status": status, "reason": ""}],
        "internal_errors": [],
        "log_lines": 1,
        **extra,
    }


@pytest.mark.parametrize(
    "compat, status, agrees",
    [
        ("applies", "applied", True),
        ("absent", "absent", True),
        ("skipped: anchor not found", "skipped", True),
        ("upstream: forks it itself", "upstream", True),
        ("applies", "skipped", False),
        ("skipped: anchor not found", "applied", False),
        ("absent", "applied", False),
        ("applies", "pending", False),  # imported with the feature on, but the hook never ran
    ],
)
def test_doctor_must_agree_with_compat(compat, status, agrees):
    report = canary.judge("x", [_run(status)], {("f", TARGET): compat})
    assert report.compared == 1
    assert (not report.failures) == agrees, report.failures


def test_verdicts_compare_only_what_ran():
    expected = {("f", TARGET): "applies"}
    assert canary.judge("x", [_run("off", enabled=False)], expected).compared == 0
    vllms = canary.judge("x", [_run("skipped", imported=canary.VLLM)], expected)
    assert vllms.compared == 0 and not vllms.failures and vllms.vllm_failures


def test_verdicts_fail_on_the_overlay():
    expected = {("f", TARGET): "applies"}
    assert canary.judge("x", [_run("applied", imports=[
        {"module": "vllm.m", "kind": canary.OVERLAY, "detail": "KeyError", "seconds": 0}])], expected).failures
    assert canary.judge("x", [_run("applied", internal_errors=["internal error: x"])], expected).failures
    assert canary.judge("x", [_run("applied", register="ConfigError: bad")], expected).failures
    assert canary.judge("x", [{"config": "c.yaml", "error": "the child died"}], expected).failures
    stop = [{"module": "vllm.m", "kind": canary.STOPPED, "detail": "StrictError", "seconds": 0}]
    predicted = {("f", TARGET): "skipped: anchor not found"}
    assert not canary.judge("x", [_run("skipped", imports=stop, strict=True)], predicted).failures
    unpredicted = canary.judge("x", [_run("skipped", imports=stop, strict=True)], expected).failures
    assert any("strict stop" in f for f in unpredicted), unpredicted
    not_strict = canary.judge("x", [_run("skipped", imports=stop)], predicted).failures
    assert any("strict stop" in f for f in not_strict), not_strict


def test_unpack_takes_sources_once(tmp_path):
    wheel = tmp_path / "vllm-9.9.9-cp38-abi3-linux_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("vllm/__init__.py", "")
        zf.writestr("vllm/configs/a.json", "{}")
        zf.writestr("vllm/_C.abi3.so", b"\x7fELF")
        zf.writestr("vllm/csrc/x.h", "")
        zf.writestr("vllm-9.9.9.dist-info/METADATA", "Name: vllm\nVersion: 9.9.9\n")
        zf.writestr("vllm-9.9.9.dist-info/RECORD", "")
    root = tmp_path / "src"
    dest = canary.unpack(str(wheel), str(root))
    files = sorted(os.path.relpath(os.path.join(d, f), dest) for d, _, fs in os.walk(dest) for f in fs)
    assert files == ["vllm-9.9.9.dist-info/METADATA", "vllm/__init__.py", "vllm/configs/a.json"]
    assert os.listdir(root) == [os.path.basename(dest)]  # no temporary folder left behind
    os.remove(os.path.join(dest, "vllm", "__init__.py"))
    assert canary.unpack(str(wheel), str(root)) == dest  # done once: not unpacked again
    assert not os.path.exists(os.path.join(dest, "vllm", "__init__.py"))


def test_adding_a_release_is_one_entry():
    assert canary.RELEASES[0] == "0.20.0"  # the oldest supported release
    assert list(canary.RELEASES) == sorted(canary.RELEASES, key=lambda r: tuple(map(int, r.split("."))))
