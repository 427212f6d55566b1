"""docker/: what can be checked without a Docker engine."""

from __future__ import annotations

import os
import re
import shlex

import pytest
import yaml

from vllm_overlap.config import load_config_file

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
