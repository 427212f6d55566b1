"""docker/test/run: the image built and the compose overlay brought up for real, on the CPU.

Slow (the stand-in base image takes minutes the first time). Where Docker is not usable and
this is not CI (``CI=true`` lets the script install and start Docker), the script declines and
the test is skipped with its reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, clean_env

pytestmark = pytest.mark.slow


def test_image_and_compose_overlay_for_real(tmp_path):
    results = tmp_path / "docker.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "docker", "test", "run"), "--json", str(results), "--logs", str(tmp_path / "logs")],
        capture_output=True, text=True, timeout=3600, env=clean_env(), cwd=ROOT,
    )
    if proc.returncode == 3:
        pytest.skip(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    r = json.loads(results.read_text())
    assert r["checks"] and all(r["checks"].values()), r["checks"]
    assert r["guard"]["base"] == r["guard"]["ours"]
    assert set(r["pip_diff"]["added"]) <= {"vllm-overlap", "wrapt"} and "vllm-overlap" in r["pip_diff"]["added"]
    on, off = r["serve"]["default.yaml"], r["serve"]["off.yaml"]
    assert len(on["texts"]) == 4 and all(on["texts"]) and on["texts"] == off["texts"]
    assert "gdn_in_proj applied (4/4 targets)" in on["overlay_line"] and "gdn_in_proj off" in off["overlay_line"]
    assert r["bad_config"]["exit_code"] not in (0, None) and len(r["bad_config"]["line"]) == 1
    print("\n" + "\n".join(proc.stdout.strip().splitlines()[-12:]))
