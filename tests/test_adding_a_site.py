"""``docs/adding-a-site.md`` lists every file a new site touches.

Every file of the repository that names a declared site's id or its feature (the feature's
name, which is also its module's, ``vllm_overlap/sites/<feature>.py``) must be one the page's
two file tables list, by its path or by a pattern (``<name>`` stands for one path component,
``*`` for part of one). Left out of the search: prose (``*.md``), the generated diffs
(``patches/``), measured results (``benchmarks/results/``, which name the sites they measured)
and the tests other than the harness (``tests/test_site_harness.py``, which holds
each site's case, is searched). Every entry of the tables must also name a file that exists.
"""

from __future__ import annotations

import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = "docs/adding-a-site.md"
HARNESS = "tests/test_site_harness.py"
TABLES = ("## The files a new site touches", "## Files that name a site and stay as they are")


def listed(page: str) -> list[str]:
    """The paths and patterns of the page's file tables: every `...` in a row's first cell."""
    entries: list[str] = []
    in_table = False
    for line in page.splitlines():
        if line.startswith("## "):
            in_table = line.strip() in TABLES
        elif in_table and line.startswith("|"):
            entries += re.findall(r"`([^`]+)`", line.split("|")[1])
    return entries


def pattern(entry: str, values: dict[str, list[str]]) -> re.Pattern:
    """A listed path or pattern as a regular expression over repository paths: ``<name>`` is
    one of ``values[name]`` where given (``<feature>``: a declared feature's name), else any one
    path component; ``*`` is any part of one."""

    def part(p: str) -> str:
        if p == "*":
            return "[^/]*"
        if p.startswith("<"):
            given = values.get(p[1:-1])
            return "(" + "|".join(map(re.escape, given)) + ")" if given else "[^/]+"
        return re.escape(p)

    return re.compile("".join(part(p) for p in re.split(r"(<[^>/]+>|\*)", entry)) + r"\Z")


def searched(path: str) -> bool:
    """Whether a file's naming of a site must be accounted for by the page."""
    if path.endswith(".md") or path.startswith(("patches/", "benchmarks/results/")):
        return False
    return path == HARNESS or not path.startswith("tests/")


def site_names(sites) -> dict[str, re.Pattern]:
    """site id -> what names it: its id or its feature's name, as a whole word."""
    return {s.id: re.compile(rf"\b({re.escape(s.id)}|{re.escape(s.feature)})\b") for s in sites}


def unlisted(files: dict[str, str], names: dict[str, re.Pattern], entries: list[str], features: list[str]) -> dict:
    """path -> the sites it names, for every searched file that names a site and matches no
    entry of the page (``features``: the feature names ``<feature>`` stands for)."""
    patterns = [pattern(e, {"feature": features}) for e in entries]
    out = {}
    for path, text in files.items():
        if not searched(path) or any(p.match(path) for p in patterns):
            continue
        sites = sorted(site for site, rx in names.items() if rx.search(text))
        if sites:
            out[path] = sites
    return out


def repository_files() -> list[str]:
    """The repository's files, committed or not (git's ignored files left out)."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT, capture_output=True, text=True, check=True,
        ).stdout
        return [p for p in out.splitlines() if os.path.isfile(os.path.join(ROOT, p))]
    except (OSError, subprocess.CalledProcessError):  # no git: walk, skipping hidden and build folders
        paths = []
        for top, dirs, names in os.walk(ROOT):
            dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("build", "dist", "__pycache__")]
            dirs[:] = [d for d in dirs if not d.endswith(".egg-info")]
            paths += [os.path.relpath(os.path.join(top, n), ROOT).replace(os.sep, "/") for n in names]
        return paths


def texts(paths: list[str]) -> dict[str, str]:
    """path -> text, for the searched files that are text."""
    out = {}
    for path in filter(searched, paths):
        try:
            with open(os.path.join(ROOT, path), encoding="utf-8") as fh:
                out[path] = fh.read()
        except UnicodeDecodeError:  # an image, say
            continue
    return out


def _page() -> str:
    with open(os.path.join(ROOT, PAGE), encoding="utf-8") as fh:
        return fh.read()


def test_the_page_lists_every_file_that_names_a_site():
    from vllm_overlap.sites import FEATURES, SITES

    missing = unlisted(texts(repository_files()), site_names(SITES.values()), listed(_page()), list(FEATURES))
    assert missing == {}, f"files that name a site, missing from {PAGE}: {missing}"


def test_every_entry_of_the_page_is_a_file_of_the_repository():
    from vllm_overlap.sites import FEATURES

    files = repository_files()
    entries = listed(_page())
    assert entries
    assert [e for e in entries if not any(pattern(e, {"feature": list(FEATURES)}).match(f) for f in files)] == []


def test_the_page_lists_the_declaration_the_builder_and_the_case():
    entries = listed(_page())
    for needed in ("vllm_overlap/sites/<feature>.py", "vllm_overlap/testing/layer_builders.py", HARNESS):
        assert needed in entries


# ---------------------------------------------------------------------------------------------
# The check itself, on made-up files
# ---------------------------------------------------------------------------------------------


class _Site:
    def __init__(self, id, feature):
        self.id, self.feature = id, feature


NAMES = site_names([_Site("foo_site", "foo")])


def test_a_file_naming_a_site_that_the_page_does_not_list_is_reported():
    files = {
        "vllm_overlap/sites/foo.py": "SITE = Site(id='foo_site')",
        "benchmarks/new_bench.py": "run('foo_site')",  # not on the page
        "configs/default.yaml": "features:\n  foo: {enabled: true}\n",  # the feature's name
        HARNESS: "SiteCase('foo_site', ...)",
    }
    entries = ["vllm_overlap/sites/<feature>.py", "configs/*.yaml"]
    assert unlisted(files, NAMES, entries, ["foo"]) == {"benchmarks/new_bench.py": ["foo_site"], HARNESS: ["foo_site"]}
    assert unlisted(files, NAMES, entries + ["benchmarks/new_bench.py", HARNESS], ["foo"]) == {}


def test_the_feature_pattern_stands_for_the_features_modules_only():
    """``vllm_overlap/sites/<feature>.py`` does not cover another module of that folder."""
    files = {"vllm_overlap/sites/foo.py": "foo_site", "vllm_overlap/engine/architectures.py": "('foo',)"}
    entries = ["vllm_overlap/sites/<feature>.py"]
    assert unlisted(files, NAMES, entries, ["foo"]) == {"vllm_overlap/engine/architectures.py": ["foo_site"]}


def test_prose_generated_diffs_results_and_other_tests_are_not_searched():
    files = {
        "README.md": "foo_site",
        "docs/sites.md": "foo_site",
        "patches/foo.diff": "+ __site__.foo_site(",
        "benchmarks/results/host_overhead/after/host_overhead.json": '{"site": "foo_site"}',
        "tests/test_foo_layer.py": "foo_site",
    }
    assert unlisted(files, NAMES, [], ["foo"]) == {}


def test_only_whole_words_name_a_site():
    files = {"a.py": "foo_site_v2 = foobar", "b.py": "from vllm_overlap.sites.foo import FEATURE"}
    assert unlisted(files, NAMES, [], ["foo"]) == {"b.py": ["foo_site"]}


def test_a_pattern_stands_for_one_path_component():
    assert pattern("tests/test_<model>_layer.py", {}).match("tests/test_minicpm3_layer.py")
    assert not pattern("tests/test_<model>_layer.py", {}).match("tests/deep/test_minicpm3_layer.py")
    assert pattern("patches/<feature>.diff", {"feature": ["foo", "bar"]}).match("patches/bar.diff")
    assert not pattern("patches/<feature>.diff", {"feature": ["foo", "bar"]}).match("patches/baz.diff")
    assert pattern("configs/*.yaml", {}).match("configs/default.yaml")
    assert not pattern("configs/*.yaml", {}).match("configs/old/default.yaml")
    assert not pattern("benchmarks/pairs.py", {}).match("benchmarks/pairs.pyc")


def test_the_tables_are_read_from_their_sections_first_cells_only():
    page = "\n".join([
        "# Adding a site",
        "| `not/a/table/of/ours.py` | x |",
        TABLES[0],
        "| file | what |",
        "| --- | --- |",
        "| `a/one.py`, `a/two.py` | see `not/this.py` |",
        "## Step by step",
        "| `nor/this.py` | x |",
        TABLES[1],
        "| `b/three.py` | why |",
    ])
    assert listed(page) == ["a/one.py", "a/two.py", "b/three.py"]
