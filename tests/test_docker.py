"""docker/: what can be checked without a Docker engine."""

from __future__ import annotations

import os
import re
import shlex

import pytest
import yaml

from vllm_overlap.config.loader import load_config_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCKER = os.path.join(ROOT, "docker")


def _expand(text: str, env: dict[str, str]) -> str:
    """Compose's ${VAR:-default} substitution."""
    return re.sub(
        r"\$\{(\w+)(?::-([^}]*))?\}", lambda m: env.get(m.group(1), m.group(2) or ""), text
    )


@pytest.fixture
def overlay():
    return yaml.safe_load(open(os.path.join(DOCKER, "compose.overlay.yaml")))


def test_overlay_serves_with_a_mounted_config(overlay):
    service = overlay["services"]["vllm"]
    assert {"build", "image", "command", "environment", "volumes"} <= set(service)
    assert service["build"]["dockerfile"] == "docker/Dockerfile"
    target = service["environment"]["VLLM_OVERLAP_CONFIG"]
    mounts = [_expand(v, {}).split(":") for v in service["volumes"]]
    assert any(dst == target for _, dst, *_ in mounts)
    assert "--model" in service["command"]


@pytest.mark.parametrize("name", ["default.yaml", "qwen3-next.yaml", "deepseek-v32.yaml", "off.yaml"])
def test_mounted_config_exists_and_validates(overlay, name):
    service = overlay["services"]["vllm"]
    target = service["environment"]["VLLM_OVERLAP_CONFIG"]
    env = {"VLLM_OVERLAP_REPO": ROOT, "VLLM_OVERLAP_CONFIG_NAME": name}
    mounts = [_expand(v, env).split(":") for v in service["volumes"]]
    source = next(src for src, dst, *_ in mounts if dst == target)
    assert os.path.isfile(source), source
    load_config_file(source)
    assert _expand(service["build"]["context"], env) == ROOT


def test_dockerfile_builds_from_vllm_and_installs_only_this_package():
    text = open(os.path.join(DOCKER, "Dockerfile")).read()
    assert re.search(r"^ARG VLLM_VERSION=", text, re.M)
    assert re.search(r"^FROM vllm/vllm-openai:\$\{VLLM_VERSION\}$", text, re.M)
    run = " ".join(line.rstrip("\\") for line in text.splitlines() if not line.startswith("#"))
    installs = [seg for seg in re.split(r"&&|;|\|\|", run) if "pip install" in seg]
    assert len(installs) == 1
    args = shlex.split(installs[0].split("pip install", 1)[1])
    assert [a for a in args if not a.startswith("-")] == ["/opt/vllm-overlap"]
    assert "COPY . /opt/vllm-overlap" in text
    # torch and vLLM versions are compared, and a mismatch is not swallowed by an `|| true`
    check = 'test "$before" = "$after"'
    assert check in run
    tail = run.split(check, 1)[1]
    assert "|| true" not in tail.replace("(vllm-overlap doctor || true)", "")


def test_package_dependencies_never_name_torch_or_vllm():
    import tomllib

    project = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]
    names = [re.split(r"[<>=! \[]", d)[0].lower() for d in project["dependencies"]]
    assert names == ["wrapt", "pydantic", "pyyaml"]


def _load(name):
    return yaml.safe_load(open(os.path.join(DOCKER, name)))


def test_the_gpu_reservation_lives_only_in_compose_gpu(overlay):
    """Compose v1 cannot drop a key in an override: a reservation in the overlay would make it
    unusable without GPUs. The overlay goes on a user's service, which has its own."""
    assert "deploy" not in overlay["services"]["vllm"]
    devices = _load("compose.gpu.yaml")["services"]["vllm"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert "deploy" not in _load("compose.cpu.yaml")["services"]["vllm"]


def test_cpu_profile_serves_the_same_model_and_port(overlay):
    cpu = _load("compose.cpu.yaml")["services"]["vllm"]
    base = overlay["services"]["vllm"]["command"]
    assert cpu["command"][: len(base)] == base
    assert cpu["command"][len(base) :][0] == "--gpu-memory-utilization"
    assert "VLLM_CPU_KVCACHE_SPACE" in cpu["environment"]


def test_dockerignore_keeps_what_the_build_needs():
    ignored = [ln.strip() for ln in open(os.path.join(ROOT, ".dockerignore")) if ln.strip() and not ln.startswith("#")]
    assert ".git" in ignored and "out/" in ignored
    for needed in ("pyproject.toml", "README.md", "vllm_overlap", "configs", "tests", "docker"):
        assert not any(needed == pattern.rstrip("/") for pattern in ignored), needed
