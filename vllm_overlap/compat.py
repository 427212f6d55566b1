"""Which rewrites apply to which vLLM release, read from the release wheels without installing.

``vllm-overlap compat 0.30.0 0.33.0`` downloads each ``vllm`` wheel once (``pip download
--no-deps``, cached), reads the target modules straight out of the zip, and runs every
feature's anchor matching on them: a matrix of feature x release x target.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import zipfile

from .patches import FEATURES
from .sources import feature_diff
from .tables import format_table


def wheel_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "vllm-overlap", "wheels")


def find_wheel(release: str, directory: str) -> str:
    """The wheel of ``vllm==release`` in ``directory``, downloaded there if missing."""
    pattern = os.path.join(directory, f"vllm-{release}-*.whl")
    found = sorted(glob.glob(pattern))
    if not found:
        os.makedirs(directory, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", f"vllm=={release}", "-d", directory],
            check=True,
        )
        found = sorted(glob.glob(pattern))
    if not found:
        raise FileNotFoundError(f"no wheel for vllm=={release} in {directory}")
    return found[0]


def wheel_reader(path: str):
    archive = zipfile.ZipFile(path)

    def read(module_name: str) -> str:
        return archive.read(module_name.replace(".", "/") + ".py").decode("utf-8")

    return read


def release_rows(release: str, read) -> list[dict]:
    """One row per feature x target for the release whose modules ``read(name)`` returns."""
    rows = []
    for feature in FEATURES.values():
        _, results = feature_diff(feature, read)
        for target, result in results.items():
            rows.append(
                {
                    "feature": feature.name,
                    "release": release,
                    "target": target.rsplit(".", 2)[-2] + "." + target.rsplit(".", 1)[-1],
                    "result": result if result == "applies" else f"skipped: {result}",
                }
            )
    return rows


def matrix(releases: list[str], directory: str | None = None) -> list[dict]:
    rows = []
    for release in releases:
        rows += release_rows(release, wheel_reader(find_wheel(release, directory or wheel_dir())))
    return rows


def matrix_table(rows: list[dict], markdown: bool = False) -> str:
    """Feature x target rows, one column per release."""
    releases = list(dict.fromkeys(r["release"] for r in rows))
    keyed: dict[tuple[str, str], dict[str, str]] = {}
    for r in rows:
        keyed.setdefault((r["feature"], r["target"]), {})[r["release"]] = r["result"]
    table = [
        {"feature": f, "target": t, **{rel: cells.get(rel, "-") for rel in releases}}
        for (f, t), cells in keyed.items()
    ]
    columns = ["feature", "target", *releases]
    if markdown:
        lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
        lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in table]
        return "\n".join(lines)
    return format_table(table, columns)
