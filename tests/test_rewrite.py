"""The anchored-rewrite engine on small synthetic modules."""

from __future__ import annotations

import importlib
import inspect
import os
import stat
import sys
import tempfile
import textwrap
import traceback

import pytest

from vllm_overlap.engine import rewrite
from vllm_overlap.engine.rewrite import Anchor, RewriteSkipped, Target, rewrite_source

SOURCE = '''
import functools


def helper(x):
    return x + 1


def deco(fn):
    @functools.wraps(fn)
    def inner(*a, **k):
        return fn(*a, **k)
    return inner


class Layer:
    scale = 3

    def forward(self, x):
        # upstream comment kept
        a = self.left(x)
        b = self.right(x)
        return helper(a) * b

    def left(self, x):
        return x * 2

    def right(self, x):
        return x + self.scale

    def twice(self, x):
        a = self.left(x)
        b = self.right(x)
        c = self.left(x)
        d = self.right(x)
        return a + b + c + d

    @deco
    def decorated(self, x):
        a = self.left(x)
        b = self.right(x)
        return a * b

    @staticmethod
    def static(x):
        a = x * 2
        b = x + 3
        return a * b

    def fails(self, x):
        a = self.left(x)
        b = self.right(x)
        raise ValueError(a + b)

    def private(self, x):
        a = self.left(x)
        b = self.right(x)
        return self.__hidden + a + b

    def shared_line(self, x):
        a = self.left(x)
        b = self.right(x); c = 1
        return a * b * c
'''

PAIR = Anchor(
    find="""
        $a = self.left(x)
        $b = self.right(x)
    """,
    replace="""
        $a, $b = _test_runtime.pair(self, x)
    """,
)


class _Runtime:
    calls = 0

    @classmethod
    def pair(cls, layer, x):
        cls.calls += 1
        return layer.left(x), layer.right(x)


@pytest.fixture
def synthetic(tmp_path, monkeypatch):
    """A fresh importable module named synthetic_mod_<n> holding SOURCE."""
    name = f"synthetic_mod_{len(sys.modules)}"
    (tmp_path / f"{name}.py").write_text(SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("VLLM_OVERLAP_CACHE_DIR", str(tmp_path / "cache"))
    module = importlib.import_module(name)
    yield module
    for target in [t for t in rewrite.rewritten_targets() if t.module == name]:
        rewrite.revert(target)
    sys.modules.pop(name, None)


def _apply(module, method, anchors=(PAIR,), feature="f"):
    return rewrite.apply(
        Target(module.__name__, f"Layer.{method}"), anchors, feature, {"_test_runtime": _Runtime}
    )


def test_match_rewrites_and_keeps_the_rest(synthetic):
    before = synthetic.Layer().forward(5)
    _Runtime.calls = 0
    path = _apply(synthetic, "forward")
    assert synthetic.Layer().forward(5) == before and _Runtime.calls == 1
    src = inspect.getsource(synthetic.Layer.forward)
    assert "a, b = _test_runtime.pair(self, x)" in src
    assert "# upstream comment kept" in src and "return helper(a) * b" in src
    assert open(path).read().endswith(src)  # the real file is what runs
    assert synthetic.Layer.forward.__qualname__ == "Layer.forward"


def test_rewritten_file_is_content_addressed_and_shows_in_tracebacks(synthetic):
    path = _apply(synthetic, "fails")
    digest = path.rsplit(".", 2)[-2]
    import hashlib

    assert hashlib.sha256(open(path).read().encode()).hexdigest().startswith(digest)
    try:
        synthetic.Layer().fails(1)
    except ValueError:
        frames = traceback.extract_tb(sys.exc_info()[2])
    assert frames[-1].filename == path and "raise ValueError(a + b)" in frames[-1].line


def test_no_match_leaves_target_untouched(synthetic):
    original = synthetic.Layer.__dict__["left"]
    with pytest.raises(RewriteSkipped, match=r"anchor `\$a = self.left\(x\)` not found, expected 1"):
        _apply(synthetic, "left")
    assert synthetic.Layer.__dict__["left"] is original


NEWER = Anchor(find="a = self.left_v2(x)\nb = self.right(x)", replace="a, b = 0, 0")


def test_an_older_releases_anchor_set_applies_when_the_newest_does_not(synthetic):
    before = synthetic.Layer().forward(5)
    _Runtime.calls = 0
    target = Target(synthetic.__name__, "Layer.forward")
    rewrite.apply(target, (NEWER,), "f", {"_test_runtime": _Runtime}, older=((PAIR,),))
    assert synthetic.Layer().forward(5) == before and _Runtime.calls == 1
    assert "a, b = _test_runtime.pair(self, x)" in inspect.getsource(synthetic.Layer.forward)


def test_when_no_anchor_set_matches_the_newest_sets_reason_is_given(synthetic):
    original = synthetic.Layer.__dict__["left"]
    target = Target(synthetic.__name__, "Layer.left")
    with pytest.raises(RewriteSkipped, match=r"anchor `a = self.left_v2\(x\)` not found"):
        rewrite.apply(target, (NEWER,), "f", {"_test_runtime": _Runtime}, older=((PAIR,),))
    assert synthetic.Layer.__dict__["left"] is original


def test_ambiguous_match_is_refused(synthetic):
    original = synthetic.Layer.__dict__["twice"]
    with pytest.raises(RewriteSkipped, match="found 2 times, expected 1"):
        _apply(synthetic, "twice")
    assert synthetic.Layer.__dict__["twice"] is original


def test_declared_count_allows_repeats(synthetic):
    before = synthetic.Layer().twice(4)
    _Runtime.calls = 0
    _apply(synthetic, "twice", (Anchor(PAIR.find, PAIR.replace, count=2),))
    assert synthetic.Layer().twice(4) == before and _Runtime.calls == 2


def test_captures_must_bind_consistently():
    src = "def f(self, x):\n    a = self.left(x)\n    b = self.right(a)\n"
    anchor = Anchor("$a = self.left(x)\n$b = self.right($a)", "$a, $b = g()")
    assert "a, b = g()" in rewrite_source(src, [anchor])
    src_bad = "def f(self, x):\n    a = self.left(x)\n    b = self.right(c)\n"
    with pytest.raises(RewriteSkipped, match="not found"):
        rewrite_source(src_bad, [anchor])


def test_formatting_does_not_matter_but_code_does():
    src = "def f(self, x):\n    a = self.left(\n        x,\n    )  # note\n    b = self.right(x)\n"
    assert "a, b = _test_runtime.pair(self, x)" in rewrite_source(src, [PAIR])
    with pytest.raises(RewriteSkipped):
        rewrite_source("def f(self, x):\n    a = self.left(y)\n    b = self.right(x)\n", [PAIR])


def test_anchor_sharing_a_line_is_refused(synthetic):
    with pytest.raises(RewriteSkipped, match="shares a line with other code"):
        _apply(synthetic, "shared_line")


def test_decorated_target_is_refused(synthetic):
    original = synthetic.Layer.__dict__["decorated"]
    with pytest.raises(RewriteSkipped, match="decorated with @deco"):
        _apply(synthetic, "decorated")
    assert synthetic.Layer.__dict__["decorated"] is original


def test_staticmethod_is_carried(synthetic):
    anchor = Anchor("a = x * 2\nb = x + 3", "a, b = _test_runtime.pair(Layer(), x)")
    before = synthetic.Layer.static(5)
    _apply(synthetic, "static", (anchor,))
    assert isinstance(synthetic.Layer.__dict__["static"], staticmethod)
    assert synthetic.Layer.static(5) == before


def test_private_names_are_refused(synthetic):
    with pytest.raises(RewriteSkipped, match="name-mangled"):
        _apply(synthetic, "private")


def test_missing_target_is_a_reason(synthetic):
    with pytest.raises(RewriteSkipped, match="Layer.nope is not defined"):
        rewrite.apply(Target(synthetic.__name__, "Layer.nope"), (PAIR,), "f")


def test_double_apply_is_a_no_op(synthetic):
    first = _apply(synthetic, "forward")
    installed = synthetic.Layer.__dict__["forward"]
    assert _apply(synthetic, "forward") == first
    assert synthetic.Layer.__dict__["forward"] is installed
    assert rewrite.applied_features(Target(synthetic.__name__, "Layer.forward")) == ["f"]


def test_revert_restores_the_original(synthetic):
    original = synthetic.Layer.__dict__["forward"]
    _apply(synthetic, "forward")
    target = Target(synthetic.__name__, "Layer.forward")
    assert rewrite.revert(target) is True
    assert synthetic.Layer.__dict__["forward"] is original
    assert rewrite.revert(target) is False
    assert rewrite.applied_features(target) == []


def test_two_features_stack_and_revert_in_order(synthetic):
    original = synthetic.Layer.__dict__["forward"]
    _apply(synthetic, "forward", feature="first")
    second = Anchor("return helper(a) * b", "return helper(a) * b * 1")
    _apply(synthetic, "forward", (second,), feature="second")
    target = Target(synthetic.__name__, "Layer.forward")
    assert rewrite.applied_features(target) == ["first", "second"]
    assert "* b * 1" in inspect.getsource(synthetic.Layer.forward)
    assert rewrite.upstream_source(target) == textwrap.dedent(inspect.getsource(original))
    rewrite.revert(target, "second")
    assert rewrite.applied_features(target) == ["first"]
    rewrite.revert(target, "first")
    assert synthetic.Layer.__dict__["forward"] is original


def test_injected_name_clash_is_refused(synthetic):
    synthetic._test_runtime = object()
    with pytest.raises(RewriteSkipped, match="global name _test_runtime already used"):
        _apply(synthetic, "forward")


def test_closure_is_refused(tmp_path):
    def outer():
        y = 2

        def inner(x):
            a = x * y
            return a

        return inner

    fn = outer()
    holder = type("Holder", (), {"inner": fn})
    mod = type(sys)("synthetic_closure")
    mod.Holder = holder
    sys.modules["synthetic_closure"] = mod
    try:
        with pytest.raises(RewriteSkipped, match="closes over y"):
            rewrite.apply(Target("synthetic_closure", "Holder.inner"), (Anchor("a = x * y", "a = y * x"),), "f")
    finally:
        del sys.modules["synthetic_closure"]


# --------------------------------------------------------------------------- the source cache
# Code is compiled only from text this process made; the files are for tracebacks and
# vLLM's compile-cache hash. Their directories are private to the user.

STACKED = Anchor("return helper(a) * b", "return helper(a) * b * 1")


def _plant(path: str, marker) -> None:
    """What an attacker with write access to the cache would do: edit the rewritten
    function so that merely defining it runs code (a default argument's expression)."""
    text = open(path, encoding="utf-8").read()
    planted = text.replace("(self, x):", f"(self, x, _p=open({str(marker)!r}, 'w').write('pwned')):", 1)
    assert planted != text
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(planted)


def test_a_planted_cache_file_runs_nothing(synthetic, tmp_path):
    """The attack of issue 9: a rewrite's file edited between two processes; the second
    process applies the same rewrite (same content address) and stacks another on top."""
    target = Target(synthetic.__name__, "Layer.forward")
    first = _apply(synthetic, "forward", feature="first")
    _apply(synthetic, "forward", (STACKED,), feature="second")
    honest = open(first, encoding="utf-8").read()
    rewrite.revert(target)  # as a new process starts: nothing applied, the files remain

    marker = tmp_path / "planted-code-ran"
    _plant(first, marker)
    assert _apply(synthetic, "forward", feature="first") == first
    _apply(synthetic, "forward", (STACKED,), feature="second")
    synthetic.Layer().forward(3)
    assert not marker.exists()
    assert open(first, encoding="utf-8").read() == honest  # the planted file was replaced
    assert "_p=" not in inspect.getsource(synthetic.Layer.forward)


def test_stacking_reads_no_file(synthetic, monkeypatch):
    target = Target(synthetic.__name__, "Layer.forward")
    first = _apply(synthetic, "forward", feature="first")
    os_remove = __import__("os").remove
    os_remove(first)  # the first rewrite's file is gone: the second stacks on its text anyway
    _apply(synthetic, "forward", (STACKED,), feature="second")
    assert rewrite.applied_features(target) == ["first", "second"]
    assert "_test_runtime.pair(self, x)" in rewrite.current_source(target)
    assert "* b * 1" in rewrite.current_source(target)


def test_stacking_refuses_a_function_replaced_after_the_first_rewrite(synthetic):
    _apply(synthetic, "forward", feature="first")
    synthetic.Layer.forward = lambda self, x: 0  # someone else's patch, after ours
    with pytest.raises(RewriteSkipped, match="replaced after vllm-overlap rewrote it"):
        _apply(synthetic, "forward", (STACKED,), feature="second")


def test_cache_directory_is_created_private(synthetic, tmp_path):
    path = _apply(synthetic, "forward")
    directory = os.path.dirname(path)
    assert directory == str(tmp_path / "cache")
    assert stat.S_IMODE(os.stat(directory).st_mode) & 0o077 == 0
    assert os.stat(directory).st_uid == os.geteuid()


def _fallback_in(monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    os.makedirs(tmp_path / "tmp")
    return rewrite.fallback_cache_dir()


def test_a_cache_directory_writable_by_others_is_refused(synthetic, tmp_path, monkeypatch):
    shared = tmp_path / "cache"
    shared.mkdir()
    shared.chmod(0o777)
    fallback = _fallback_in(monkeypatch, tmp_path)
    path = _apply(synthetic, "forward")
    assert os.path.dirname(path) == fallback
    assert str(os.geteuid()) in fallback and fallback.startswith(str(tmp_path / "tmp"))
    assert os.listdir(shared) == []


def test_cache_directories_owned_by_someone_else_are_refused(synthetic, tmp_path, monkeypatch):
    """Every directory exists and belongs to this process's real uid; the check is told the
    process runs as another user, so to it they belong to someone else."""
    fallback = _fallback_in(monkeypatch, tmp_path)
    os.makedirs(tmp_path / "cache", mode=0o700)
    os.makedirs(fallback, mode=0o700)
    real = os.geteuid()
    monkeypatch.setattr(os, "geteuid", lambda: real + 1)
    original = synthetic.Layer.__dict__["forward"]
    with pytest.raises(RewriteSkipped) as info:
        _apply(synthetic, "forward")
    reason = str(info.value)
    assert reason.startswith("no private cache directory for the rewritten source")
    # the first directory of the chain that is this (real) user's: tmp_path/cache as root
    assert f" is owned by uid {real}, not " in reason
    assert synthetic.Layer.__dict__["forward"] is original


def test_a_link_in_place_of_the_cache_directory_is_refused(synthetic, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (tmp_path / "cache").symlink_to(elsewhere)
    fallback = _fallback_in(monkeypatch, tmp_path)
    assert os.path.dirname(_apply(synthetic, "forward")) == fallback
    assert os.listdir(elsewhere) == []
