"""``vllm-overlap config [NAME]``: the sample configs shipped inside the package.

Without a name, lists them with their first comment line; with one, prints that file, to start a
config from (``vllm-overlap config qwen3-next > overlay.yaml``). They are the repository's
``configs/`` folder, installed with the package as ``vllm_overlap/configs``.
"""

from __future__ import annotations

import sys
from importlib import resources

from vllm_overlap.cli.command import Command

SUFFIX = ".yaml"


def samples() -> dict[str, str]:
    """name (file name without ``.yaml``) -> text, sorted by name."""
    folder = resources.files("vllm_overlap").joinpath("configs")
    found = {}
    for entry in folder.iterdir():
        if entry.name.endswith(SUFFIX) and entry.is_file():
            found[entry.name[: -len(SUFFIX)]] = entry.read_text(encoding="utf-8")
    return dict(sorted(found.items()))


def summary(text: str) -> str:
    """The sample's first comment line, else its first line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    comments = [line.lstrip("# ").rstrip() for line in lines if line.startswith("#")]
    return comments[0] if comments else (lines[0] if lines else "")


def run(args) -> int:
    found = samples()
    if args.name is None:
        width = max(map(len, found), default=0)
        for name, text in found.items():
            print(f"{name:<{width}}  {summary(text)}")
        print("\nprint one: vllm-overlap config NAME > overlay.yaml; use it: VLLM_OVERLAP_CONFIG=overlay.yaml")
        return 0
    name = args.name[: -len(SUFFIX)] if args.name.endswith(SUFFIX) else args.name
    if name not in found:
        print(f"no sample config named {args.name!r}; the samples: {', '.join(found)}", file=sys.stderr)
        return 2
    sys.stdout.write(found[name])
    return 0


def arguments(parser) -> None:
    parser.add_argument("name", nargs="?", default=None, help="a sample's name (without .yaml); omit to list them")


COMMAND = Command("config", "list the sample configs shipped with the package, or print one", run, arguments)
