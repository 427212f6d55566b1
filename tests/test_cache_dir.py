"""The private directory of the rewritten sources (vllm_overlap/engine/cache_dir.py): the whole chain
leading to it is checked, the file is written relative to the checked directory's descriptor,
and doctor says which directory is in use and why any other was refused."""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import subprocess
import sys
import tempfile

import pytest

from vllm_overlap.engine import cache_dir, rewrite

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another user needs root")
OTHER_UID = 4242
DATA = b"def f():\n    return 1\n"


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    """Primary candidate tmp_path/cache; the temp directory tmp_path/tmp (sticky, like /tmp)."""
    monkeypatch.setenv(cache_dir.ENV, str(tmp_path / "cache"))
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    tmp.chmod(0o1777)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp_path


def _write(name: str = "f.0123.py", data: bytes = DATA) -> str:
    return cache_dir.write_file(name, data)


def test_the_primary_directory_is_created_private_and_used(dirs):
    path = _write()
    assert path == str(dirs / "cache" / "f.0123.py")
    assert open(path, "rb").read() == DATA
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(dirs / "cache").st_mode) == 0o700
    assert [n for n in os.listdir(dirs / "cache")] == ["f.0123.py"]  # no temporary left


def test_a_parent_writable_by_others_is_refused(dirs):
    """Not only the last component: someone who can write to a parent can swap the rest."""
    shared = dirs / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    os.environ[cache_dir.ENV] = str(shared / "mine" / "cache")
    path = _write()
    assert path.startswith(str(dirs / "tmp" / f"vllm-overlap-{os.geteuid()}"))
    assert os.listdir(shared) == []  # nothing created under it
    choice = cache_dir.select()
    assert choice.refused == ((str(shared / "mine" / "cache"), f"{shared} is writable by others (mode 777)"),)


def test_a_sticky_parent_is_fine(dirs):
    sticky = dirs / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    os.environ[cache_dir.ENV] = str(sticky / "cache")
    assert _write() == str(sticky / "cache" / "f.0123.py")


def test_a_group_writable_cache_directory_is_refused(dirs):
    (dirs / "cache").mkdir()
    (dirs / "cache").chmod(0o770)
    assert not _write().startswith(str(dirs / "cache"))
    assert "writable by others (mode 770)" in cache_dir.select().refused[0][1]


@needs_root
def test_a_temp_directory_entry_another_user_created_is_refused(dirs):
    """$TMPDIR/vllm-overlap-<uid> pre-created by another user: its owner could rename
    ``rewritten`` inside it, so the fallback is refused even though ``rewritten`` would be ours."""
    (dirs / "cache").mkdir()
    (dirs / "cache").chmod(0o777)  # the primary is refused too
    planted = dirs / "tmp" / f"vllm-overlap-{os.geteuid()}"
    planted.mkdir(mode=0o755)
    os.chown(planted, OTHER_UID, OTHER_UID)
    with pytest.raises(cache_dir.Unsafe) as info:
        _write()
    assert f"{planted} is owned by uid {OTHER_UID}, not root or this user" in str(info.value)
    assert os.listdir(planted) == []


@needs_root
def test_a_parent_owned_by_another_user_is_refused(dirs):
    theirs = dirs / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, OTHER_UID, OTHER_UID)
    os.environ[cache_dir.ENV] = str(theirs / "cache")
    assert not _write().startswith(str(theirs))
    assert cache_dir.select().refused[0][1].startswith(f"{theirs} is owned by uid {OTHER_UID}")


def test_a_link_on_the_way_owned_by_this_user_is_followed(dirs):
    real = dirs / "real"
    real.mkdir(mode=0o700)
    (dirs / "link").symlink_to(real)
    os.environ[cache_dir.ENV] = str(dirs / "link" / "cache")
    path = _write()
    assert path == str(dirs / "link" / "cache" / "f.0123.py")
    assert os.listdir(real / "cache") == ["f.0123.py"]


def test_a_relative_link_with_dots_on_the_way_is_followed(dirs):
    (dirs / "a" / "b").mkdir(parents=True, mode=0o700)
    (dirs / "a" / "b" / "up").symlink_to("../../c")
    (dirs / "c").mkdir(mode=0o700)
    os.environ[cache_dir.ENV] = str(dirs / "a" / "b" / "up" / "cache")
    _write()
    assert os.listdir(dirs / "c" / "cache") == ["f.0123.py"]


@needs_root
def test_a_link_on_the_way_owned_by_another_user_is_refused(dirs):
    real = dirs / "real"
    real.mkdir(mode=0o700)
    (dirs / "link").symlink_to(real)
    os.lchown(dirs / "link", OTHER_UID, OTHER_UID)
    os.environ[cache_dir.ENV] = str(dirs / "link" / "cache")
    assert not _write().startswith(str(dirs / "link"))
    assert os.listdir(real) == []
    assert f"{dirs / 'link'} is a symbolic link owned by uid {OTHER_UID}" in cache_dir.select().refused[0][1]


def test_a_loop_of_links_is_refused(dirs):
    (dirs / "x").symlink_to(dirs / "y")
    (dirs / "y").symlink_to(dirs / "x")
    os.environ[cache_dir.ENV] = str(dirs / "x" / "cache")
    _write()
    assert "more than 40 symbolic links" in cache_dir.select().refused[0][1]


def test_a_file_in_the_way_is_refused(dirs):
    (dirs / "file").write_text("")
    os.environ[cache_dir.ENV] = str(dirs / "file" / "cache")
    _write()
    assert cache_dir.select().refused[0][1] == f"{dirs / 'file'}: Not a directory"


def test_a_swap_after_the_check_does_not_move_the_write(dirs, monkeypatch):
    """The directory is renamed and a link to a directory anyone can write put in its place
    between the check and the write: the file goes into the directory that was checked (by
    its descriptor), and since the path no longer names it, that candidate is given up."""
    evil = dirs / "evil"
    evil.mkdir()
    evil.chmod(0o777)
    original = cache_dir._holds_exactly

    def swap_then_look(dir_fd, name, data):
        if not (dirs / "cache.checked").exists():
            os.rename(dirs / "cache", dirs / "cache.checked")
            (dirs / "cache").symlink_to(evil)
        return original(dir_fd, name, data)

    monkeypatch.setattr(cache_dir, "_holds_exactly", swap_then_look)
    path = _write()
    assert os.listdir(evil) == []
    assert os.listdir(dirs / "cache.checked") == ["f.0123.py"]
    assert path.startswith(str(dirs / "tmp"))  # the fallback


def test_an_exact_file_is_kept_and_a_different_one_replaced(dirs):
    path = _write()
    inode = os.stat(path).st_ino
    assert _write() == path and os.stat(path).st_ino == inode
    with open(path, "wb") as fh:
        fh.write(b"other")
    assert _write() == path and open(path, "rb").read() == DATA


def test_a_fifo_in_place_of_the_file_does_not_block(dirs):
    (dirs / "cache").mkdir(mode=0o700)
    os.mkfifo(dirs / "cache" / "f.0123.py")

    class Hung(BaseException):  # not an OSError, which the reader would take for "no file"
        pass

    def hung(*_):
        raise Hung("opening the FIFO blocked")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    try:
        path = _write()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert stat.S_ISREG(os.lstat(path).st_mode) and open(path, "rb").read() == DATA


def test_falling_back_logs_one_line_once(dirs, caplog):
    (dirs / "cache").mkdir()
    (dirs / "cache").chmod(0o777)
    cache_dir._logged.clear()
    with caplog.at_level(logging.WARNING):
        _write("a.py")
        _write("b.py")
    lines = [r.getMessage() for r in caplog.records if "rewritten sources go to" in r.getMessage()]
    assert len(lines) == 1, lines
    assert f"{dirs / 'cache'} is writable by others" in lines[0] and str(dirs / "tmp") in lines[0]


def test_no_usable_directory_skips_the_rewrite_with_every_reason(dirs, monkeypatch):
    (dirs / "cache").mkdir()
    (dirs / "cache").chmod(0o777)
    monkeypatch.setattr(tempfile, "tempdir", str(dirs / "cache"))
    with pytest.raises(rewrite.RewriteSkipped) as info:
        rewrite._write_source("mod.f", "x = 1\n")
    reason = str(info.value)
    assert reason.startswith("no private cache directory for the rewritten source: ")
    assert reason.count("is writable by others") == 2


def test_doctor_line_names_the_directory_in_use_and_each_refusal(dirs):
    (dirs / "cache").mkdir()
    (dirs / "cache").chmod(0o777)
    rep = cache_dir.report()
    fallback = str(dirs / "tmp" / f"vllm-overlap-{os.geteuid()}" / "rewritten")
    assert rep == {
        "directory": fallback,
        "refused": [{"path": str(dirs / "cache"), "reason": f"{dirs / 'cache'} is writable by others (mode 777)"}],
    }
    from vllm_overlap.cli.doctor import doctor_report

    head = {
        "vllm-overlap": "0", "vllm": "0", "torch": "0", "platform": "cpu", "config": "x",
        "config_fingerprint": "0", "strict": False, "dual_batch_overlap": "-", "ok": True,
        "rows": [{"feature": "f", "target": "t", "enabled": True, "anchors": "1/1", "result": "applied"}],
    }
    text = doctor_report({**head, "cache_dir": rep})
    assert f"cache:    {fallback} (refused: {dirs / 'cache'} is writable by others (mode 777))" in text


def test_doctor_json_reports_the_cache_directory(dirs):
    from conftest import clean_env

    (dirs / "cache").mkdir()
    (dirs / "cache").chmod(0o777)
    env = clean_env({"VLLM_OVERLAP": "0", "VLLM_OVERLAP_CACHE_DIR": str(dirs / "cache"), "TMPDIR": str(dirs / "tmp")})
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_overlap.cli", "doctor", "--json"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rep = json.loads(proc.stdout)["cache_dir"]
    assert rep["directory"] == str(dirs / "tmp" / f"vllm-overlap-{os.geteuid()}" / "rewritten")
    assert rep["refused"] == [{"path": str(dirs / "cache"), "reason": f"{dirs / 'cache'} is writable by others (mode 777)"}]
