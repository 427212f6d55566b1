"""``vllm-overlap diff [FEATURE]``: the unified diff of the rewrites against the installed vLLM."""

from __future__ import annotations

import sys

from vllm_overlap.cli.command import Command


def run(args) -> int:
    from vllm_overlap.engine.sources import ABSENT, APPLIES, feature_diff, read_installed
    from vllm_overlap.sites import FEATURES

    names = [args.feature] if args.feature else list(FEATURES)
    unknown = [n for n in names if n not in FEATURES]
    if unknown:
        print(f"unknown feature {unknown[0]!r}; known: {', '.join(FEATURES)}", file=sys.stderr)
        return 2
    for name in names:
        diff, results = feature_diff(FEATURES[name], read_installed)
        for target, result in results.items():
            if result != APPLIES and not result.startswith(ABSENT):  # another release's shape
                print(f"# {name}: {target} skipped: {result}", file=sys.stderr)
        sys.stdout.write(diff)
    return 0


def arguments(parser) -> None:
    parser.add_argument("feature", nargs="?")


COMMAND = Command("diff", "unified diff of the rewrites against the installed vLLM", run, arguments)
