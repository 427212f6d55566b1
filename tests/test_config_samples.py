"""``vllm-overlap config``: the sample configs ship inside the package and the command lists and
prints them; a wheel built from this tree carries them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

import pytest
from conftest import clean_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")


def samples_on_disk() -> dict[str, bytes]:
    return {
        name[: -len(".yaml")]: open(os.path.join(CONFIGS, name), "rb").read()
        for name in sorted(os.listdir(CONFIGS))
        if name.endswith(".yaml")
    }


def vllm_overlap_config(*args):
    return subprocess.run(
        [sys.executable, "-m", "vllm_overlap.cli", "config", *args],
        env=clean_env(None),
        capture_output=True,
        timeout=120,
    )


def test_the_list_names_every_sample_with_its_first_comment():
    proc = vllm_overlap_config()
    assert proc.returncode == 0, proc.stderr
    listed = [line.split()[0] for line in proc.stdout.decode().splitlines() if line and not line.startswith("print")]
    assert listed == list(samples_on_disk())
    qwen = next(line for line in proc.stdout.decode().splitlines() if line.startswith("qwen3-next "))
    assert "Qwen3-Next / Qwen3.5 (Gated DeltaNet)" in qwen  # its file's first comment line


@pytest.mark.parametrize("name", ["user-site-minicpm3", "off.yaml"])
def test_a_sample_prints_byte_for_byte(name):
    proc = vllm_overlap_config(name)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == samples_on_disk()[name.removesuffix(".yaml")]


def test_an_unknown_sample_is_one_line_and_exit_2():
    proc = vllm_overlap_config("no-such-sample")
    assert proc.returncode == 2 and proc.stdout == b""
    err = proc.stderr.decode().strip().splitlines()
    assert len(err) == 1 and "no sample config named 'no-such-sample'" in err[0] and "qwen3-next" in err[0]


def test_a_wheel_built_from_this_tree_carries_the_samples(tmp_path):
    """What `pip install` puts in site-packages: the package links the repository's configs/,
    and the wheel must hold the files themselves."""
    tree = tmp_path / "tree"
    shutil.copytree(ROOT, tree, symlinks=True, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(tree), "-w", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    (wheel,) = [p for p in os.listdir(tmp_path) if p.endswith(".whl")]
    with zipfile.ZipFile(tmp_path / wheel) as zf:
        shipped = {n.rpartition("/")[2][: -len(".yaml")]: zf.read(n) for n in zf.namelist() if n.startswith("vllm_overlap/configs/")}
        entry_points = zf.read(next(n for n in zf.namelist() if n.endswith("entry_points.txt"))).decode()
    assert shipped == samples_on_disk()
    assert "vllm-overlap = vllm_overlap.cli:main" in entry_points
    assert "vllm_overlap = vllm_overlap:register" in entry_points
