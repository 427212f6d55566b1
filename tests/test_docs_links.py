"""The README is a front door and the docs hold together: every relative link and every
``#anchor`` in README.md and docs/*.md resolves (the file exists; the anchor is the GitHub-style
slug of a heading in the target page), the README is at most 200 lines, and its first screen
gives the two fresh-machine commands in one code block."""

from __future__ import annotations

import glob
import os
import re

from conftest import ROOT

README_MAX_LINES = 200
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)


def pages() -> list[str]:
    return [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def prose_lines(text: str):
    """(line number, line) outside fenced code blocks."""
    fence = None
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if match:
            if fence is None:
                fence = match.group(1)
            elif match.group(1) == fence:
                fence = None
            continue
        if fence is None:
            yield number, line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text: lower case, every character but letters, digits,
    ``_``, ``-`` and spaces dropped, each space a ``-``."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading's anchor in a page; a repeated slug gets ``-1``, ``-2``, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose_lines(text):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(text: str):
    """(line number, target) of every link and image outside code (fenced blocks, code spans)."""
    for number, line in prose_lines(text):
        for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):
            yield number, target


def broken(paths: list[str]) -> list[str]:
    """``page:line: target: why`` for each relative link or anchor that does not resolve."""
    problems = []
    for page in paths:
        with open(page, encoding="utf-8") as fh:
            text = fh.read()
        for number, target in links(text):
            if SCHEME.match(target):
                continue
            path, _, anchor = target.partition("#")
            where = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
            name = f"{os.path.basename(page)}:{number}: {target}"
            if not os.path.exists(where):
                problems.append(f"{name}: no file {os.path.relpath(where, os.path.dirname(page))}")
            elif anchor:
                if not where.endswith(".md"):
                    problems.append(f"{name}: an anchor into a file that is not a page")
                    continue
                with open(where, encoding="utf-8") as fh:
                    if anchor not in anchors(fh.read()):
                        problems.append(f"{name}: no heading #{anchor}")
    return problems


def test_every_relative_link_and_anchor_resolves():
    assert len(pages()) > 1, "docs/ has no pages"
    assert broken(pages()) == []


def test_the_readme_is_at_most_200_lines():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move the depth to docs/"


def test_the_readmes_first_screen_gives_the_two_fresh_machine_commands_in_one_block():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        first_screen = "\n".join(fh.read().splitlines()[:50])
    blocks = re.findall(r"^```bash\n(.*?)^```", first_screen, re.S | re.M)
    commands = [[ln.split("#", 1)[0].strip() for ln in b.splitlines() if ln.strip()] for b in blocks]
    assert ["bash .ci/run demo", "bash .ci/run"] in commands, blocks


def test_slug_is_githubs():
    """Anchors GitHub gives these headings (punctuation dropped, spaces kept as hyphens)."""
    assert slug("Develop / on a fresh machine") == "develop--on-a-fresh-machine"
    assert slug("How it is tested (no GPU needed)") == "how-it-is-tested-no-gpu-needed"
    assert slug("Models and pairs not declared yet (vLLM 0.33)") == "models-and-pairs-not-declared-yet-vllm-033"
    assert slug("`gdn_in_proj`") == "gdn_in_proj"
    assert slug("Sites: what each feature changes") == "sites-what-each-feature-changes"


def test_the_check_finds_each_kind_of_broken_link(tmp_path):
    """The control: a missing file, a missing anchor in another page and in the same page, and an
    anchor into a file that is not a page are found; good links, links in code, a repeated
    heading's ``-1`` anchor and absolute URLs are not."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (tmp_path / "notes.txt").write_text("plain\n")
    (docs / "b.md").write_text("# Page B\n\n## Same\n\ntext\n\n## Same\n\n```bash\n# Not a heading\n```\n")
    (tmp_path / "a.md").write_text(
        "# Page A: intro\n"
        "[ok](docs/b.md) [ok](docs/b.md#same) [ok](docs/b.md#same-1) [ok](#page-a-intro)\n"
        "[ok](https://example.com/x.md#nowhere) ![ok](notes.txt) `[in code](missing.md)`\n"
        "[missing file](docs/c.md)\n"
        "[missing anchor](docs/b.md#same-2)\n"
        "[heading in a fence](docs/b.md#not-a-heading)\n"
        "[missing here](#nowhere)\n"
        "[anchor into text](notes.txt#x)\n"
        "```\n[fenced](missing.md)\n```\n"
    )
    found = broken([str(tmp_path / "a.md"), str(docs / "b.md")])
    assert found == [
        "a.md:4: docs/c.md: no file docs/c.md",
        "a.md:5: docs/b.md#same-2: no heading #same-2",
        "a.md:6: docs/b.md#not-a-heading: no heading #not-a-heading",
        "a.md:7: #nowhere: no heading #nowhere",
        "a.md:8: notes.txt#x: an anchor into a file that is not a page",
    ]
