"""Which rewrites apply to which vLLM release, read from the release wheels without installing.

``vllm-overlap compat 0.30.0 0.33.0`` downloads each ``vllm`` wheel once (``pip download
--no-deps``, cached), reads the target modules straight out of the zip, and runs every
site's anchor matching on them: a matrix of site x target x release (``--by-site``: one row
per site, ``applies`` only where every target the release has does).
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import zipfile

from vllm_overlap.cli.command import Command
from vllm_overlap.cli.tables import format_table
from vllm_overlap.engine.sources import ABSENT, APPLIES, UPSTREAM, feature_diff
from vllm_overlap.sites import FEATURES


def cache_base() -> str:
    """``$XDG_CACHE_HOME``, else ``~/.cache``."""
    return os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")


def wheel_dir() -> str:
    return os.path.join(cache_base(), "vllm-overlap", "wheels")


def cached_wheels(release: str, directory: str) -> list[str]:
    """The wheels of ``vllm==release`` already in ``directory``, sorted."""
    return sorted(glob.glob(os.path.join(directory, f"vllm-{release}-*.whl")))


def find_wheel(release: str, directory: str, download: bool = True) -> str:
    """The wheel of ``vllm==release`` in ``directory``, downloaded there if missing (unless
    ``download`` is False)."""
    found = cached_wheels(release, directory)
    if not found and download:
        os.makedirs(directory, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", f"vllm=={release}", "-d", directory],
            check=True,
        )
        found = cached_wheels(release, directory)
    if not found:
        raise FileNotFoundError(f"no wheel for vllm=={release} in {directory}")
    return found[0]


def wheel_reader(path: str):
    archive = zipfile.ZipFile(path)

    def read(module_name: str) -> str:
        return archive.read(module_name.replace(".", "/") + ".py").decode("utf-8")

    return read


def _short(module: str, qualname: str) -> str:
    """``<package>.<module>:<qualname>``: enough to tell a site's code shapes apart."""
    return ".".join(module.split(".")[-2:]) + ":" + qualname


def release_rows(release: str, read) -> list[dict]:
    """One row per site x target for the release whose modules ``read(name)`` returns:
    ``applies``, ``absent`` (this release has no such module, class or method: another
    release's code shape), ``upstream: <how>`` (upstream forks the pair itself there: the
    overlay steps aside) or ``skipped: <why>``."""
    rows = []
    for feature in FEATURES.values():
        _, results = feature_diff(feature, read)
        for site in feature.sites:
            for target in site.targets:
                result = results[str(target)]
                if result.startswith(ABSENT):
                    result = ABSENT
                elif result != APPLIES and not result.startswith(UPSTREAM):
                    result = f"skipped: {result}"
                rows.append(
                    {
                        "feature": feature.name,
                        "site": site.id,
                        "release": release,
                        "module": target.module,
                        "target": target.qualname,
                        "result": result,
                    }
                )
    return rows


def matrix(releases: list[str], directory: str | None = None) -> list[dict]:
    rows = []
    for release in releases:
        rows += release_rows(release, wheel_reader(find_wheel(release, directory or wheel_dir())))
    return rows


def site_result(results: list[tuple[str, str]]) -> str:
    """One site's cell from its targets' ``(qualname, result)``: ``applies`` only where every
    target this release has applies; ``-`` where it has none of them; else what each other
    target does, after how many apply (never ``applies`` when one of its targets misses)."""
    present = [(target, result) for target, result in results if result != ABSENT]
    if not present:
        return "-"
    applied = sum(result == APPLIES for _, result in present)
    if applied == len(present):
        return APPLIES
    others = [f"{target.rsplit('.', 1)[-1]} {result}" for target, result in present if result != APPLIES]
    head = [f"applies {applied}/{len(present)}"] if applied else []
    return "; ".join(head + others)


def matrix_table(rows: list[dict], markdown: bool = False, by_site: bool = False) -> str:
    """Site x target rows (or one row per site), one column per release."""
    releases = list(dict.fromkeys(r["release"] for r in rows))
    keyed: dict[tuple[str, ...], dict[str, list[str]]] = {}
    for r in rows:
        key = (r["site"],) if by_site else (r["site"], _short(r["module"], r["target"]))
        keyed.setdefault(key, {}).setdefault(r["release"], []).append((r["target"], r["result"]))
    head = ["site"] if by_site else ["site", "target"]
    table = []
    for key, cells in keyed.items():
        row = dict(zip(head, key))
        for rel in releases:
            results = cells.get(rel, [])
            if by_site:
                row[rel] = site_result(results)
            else:
                row[rel] = "-" if not results or results[0][1] == ABSENT else results[0][1]
        table.append(row)
    columns = [*head, *releases]
    if markdown:
        lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
        lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in table]
        return "\n".join(lines)
    return format_table(table, columns)


# The releases the support matrix covers (one per minor, its newest patch; 0.20.0 too).
SUPPORTED_RELEASES = (
    "0.20.0",
    "0.20.2",
    "0.21.0",
    "0.22.1",
    "0.23.0",
    "0.24.0",
    "0.25.1",
    "0.26.0",
    "0.27.1",
    "0.28.0",
    "0.29.0",
    "0.30.0",
    "0.31.0",
    "0.32.0",
    "0.33.0",
    "0.34.0",
)


def run(args) -> int:
    rows = matrix(args.releases, args.wheel_dir)
    print(matrix_table(rows, markdown=args.markdown, by_site=args.by_site))
    return 0


def arguments(parser) -> None:
    parser.add_argument("releases", nargs="*", default=list(SUPPORTED_RELEASES))
    parser.add_argument("--wheel-dir", default=None, help="where wheels are kept (default: the cache)")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--by-site", action="store_true", help="one row per site, not per target")


COMMAND = Command(
    "compat", "which rewrites apply to vLLM releases (downloads their wheels, no install)", run, arguments
)
