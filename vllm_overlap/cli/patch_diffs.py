"""The files in the repository's ``patches/``: one reviewable diff per feature.

Each starts with one header line naming the vLLM release it was made against; ``patch -p1``
run in site-packages applies it (patch ignores the header). A test regenerates them from the
installed vLLM and fails on drift; ``python -m vllm_overlap.cli.patch_diffs DIR`` rewrites them.
"""

from __future__ import annotations

import os
import sys

from vllm_overlap.engine import sources
from vllm_overlap.engine.site import Feature
from vllm_overlap.engine.sources import feature_diff, read_installed


def installed_vllm() -> str:
    found = sources.installed_vllm()
    if found is None:
        raise RuntimeError("no vLLM installed")
    return " ".join(found)


def header(feature: Feature, release: str) -> str:
    return f"# vllm-overlap feature {feature.name} against {release} (apply: patch -p1 in site-packages)\n"


def render(feature: Feature) -> str:
    diff, _ = feature_diff(feature, read_installed)
    return header(feature, installed_vllm()) + diff


def write_all(directory: str) -> list[str]:
    from vllm_overlap.sites import FEATURES

    paths = []
    for feature in FEATURES.values():
        path = os.path.join(directory, f"{feature.name}.diff")
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(render(feature))
        paths.append(path)
    return paths


if __name__ == "__main__":
    for written in write_all(sys.argv[1] if len(sys.argv) > 1 else "patches"):
        print(written)
