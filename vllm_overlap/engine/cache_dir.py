"""The private directory that holds the rewritten sources' files, and the writing of them.

``rewrite.py`` compiles each rewritten function from memory and names, as its file, a
content-addressed copy of the text kept here (for tracebacks and vLLM's compile-cache hash;
nothing is ever compiled or imported from it). The copy must sit where no other user can put
or change a file, so a directory is used only when it and the chain of directories leading to
it are safe, checked the way it is used:

* Candidates, in order: ``$VLLM_OVERLAP_CACHE_DIR``, else
  ``$XDG_CACHE_HOME/vllm-overlap/rewritten`` (``~/.cache/...`` without it); then
  ``<temp dir>/vllm-overlap-<uid>/rewritten``. The first safe one is used.
* The path is walked from ``/`` one component at a time, each opened relative to the
  descriptor of the one above it (``openat`` with ``O_DIRECTORY | O_NOFOLLOW``), so what is
  checked is what is used and nothing can be swapped in between by path. Missing components
  are created 0700.
* Every directory on the way must be owned by root or this user and writable by nobody else
  (no group or other write bit); a sticky directory owned by root or this user (``/tmp``) may
  be writable by others as a parent, since others can add entries there but not rename or
  remove ours. A symbolic link on the way is followed (40 at most) only when root or this user
  owns it (the kernel's ``protected_symlinks`` rule). The directory itself must be a real
  directory (not a link), owned by this user, writable by nobody else.
* The file is written relative to that directory's descriptor: a new temporary file
  (``O_CREAT | O_EXCL | O_NOFOLLOW``, 0600) renamed over the content-addressed name
  (``renameat`` within the directory; concurrent workers write the same bytes). An existing
  file is kept only if it is a regular file whose bytes are exactly the text. The path handed
  back is checked to name the file written.

Every refused candidate is recorded with its reason (:func:`report`, shown by ``vllm-overlap
doctor``), and falling back past one logs a line once per process.
"""

from __future__ import annotations

import os
import secrets
import stat
import tempfile
from collections import deque
from dataclasses import dataclass

ENV = "VLLM_OVERLAP_CACHE_DIR"
MAX_LINKS = 40
# A descriptor that can be walked from without read permission on the directory (Linux).
_DIR_FLAGS = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class Unsafe(Exception):
    """A directory that must not hold the rewritten sources; the message says why."""


def primary_dir() -> str:
    """``$VLLM_OVERLAP_CACHE_DIR``, else ``$XDG_CACHE_HOME/vllm-overlap/rewritten``."""
    return os.environ.get(ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "vllm-overlap",
        "rewritten",
    )


def fallback_dir() -> str:
    """Where the rewritten sources go when the primary directory is refused: a directory of
    this user's own in the temp directory (if another user created it first, it is refused)."""
    return os.path.join(tempfile.gettempdir(), f"vllm-overlap-{os.geteuid()}", "rewritten")


def candidates() -> list[str]:
    return [os.path.abspath(primary_dir()), os.path.abspath(fallback_dir())]


def _problem(where: str, info: os.stat_result, uid: int, last: bool) -> str | None:
    if not stat.S_ISDIR(info.st_mode):
        return f"{where} is not a directory"
    owners = (uid,) if last else (0, uid)
    if info.st_uid not in owners:
        who = "this user" if last else "root or this user"
        return f"{where} is owned by uid {info.st_uid}, not {who} ({uid})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and (last or not info.st_mode & stat.S_ISVTX):
        return f"{where} is writable by others (mode {stat.S_IMODE(info.st_mode):o})"
    return None


def open_private(directory: str, create: bool = True) -> int:
    """A descriptor of ``directory`` after checking the whole chain that leads to it (see the
    module docstring); missing components are created 0700 when ``create``. Raises
    :class:`Unsafe` naming the first component that fails."""
    uid = os.geteuid()
    parts = deque(os.path.abspath(directory).split("/"))
    stack: list[tuple[int, str]] = []  # (descriptor, path) from "/" down to the current one

    def close_all():
        while stack:
            os.close(stack.pop()[0])

    def step(name: str, where: str) -> int:
        fd = os.open(name, _DIR_FLAGS, dir_fd=stack[-1][0]) if stack else os.open(name, _DIR_FLAGS)
        problem = _problem(where, os.fstat(fd), uid, last=False)
        if problem:
            os.close(fd)
            raise Unsafe(problem)
        return fd

    links = 0
    where = "/"
    try:
        stack.append((step("/", "/"), "/"))
        while parts:
            name = parts.popleft()
            if name in ("", "."):
                continue
            fd, here = stack[-1]
            if name == "..":
                if len(stack) > 1:
                    os.close(stack.pop()[0])
                continue
            where = os.path.join(here, name)
            last = not any(p not in ("", ".") for p in parts)
            try:
                info = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                if not create:
                    raise Unsafe(f"{where} does not exist") from None
                try:
                    os.mkdir(name, 0o700, dir_fd=fd)
                except FileExistsError:
                    pass
                info = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISLNK(info.st_mode):
                if last:
                    raise Unsafe(f"{where} is a symbolic link, not a directory")
                if info.st_uid not in (0, uid):
                    raise Unsafe(
                        f"{where} is a symbolic link owned by uid {info.st_uid}, not root or this user ({uid})"
                    )
                links += 1
                if links > MAX_LINKS:
                    raise Unsafe(f"{where}: more than {MAX_LINKS} symbolic links")
                target = os.readlink(name, dir_fd=fd)
                if target.startswith("/"):
                    close_all()
                    stack.append((step("/", "/"), "/"))
                parts.extendleft(reversed(target.split("/")))
                continue
            stack.append((step(name, where), where))
        fd, where = stack[-1]
        problem = _problem(where, os.fstat(fd), uid, last=True)  # the directory itself
        if problem:
            raise Unsafe(problem)
        return stack.pop()[0]
    except OSError as exc:
        raise Unsafe(f"{where}: {exc.strerror or exc}") from None
    finally:
        close_all()


def private_dir_problem(directory: str) -> str | None:
    """None if ``directory`` (created if missing) is fit to hold the rewritten sources, else why not."""
    try:
        os.close(open_private(directory))
    except Unsafe as exc:
        return str(exc)
    return None


@dataclass(frozen=True)
class Choice:
    directory: str | None  # the one in use; None when every candidate was refused
    refused: tuple[tuple[str, str], ...]  # (candidate, why) for each one passed over


def select() -> Choice:
    """Which candidate the rewritten sources go to now, and why each one before it was refused."""
    refused = []
    for directory in candidates():
        problem = private_dir_problem(directory)
        if problem is None:
            return Choice(directory, tuple(refused))
        refused.append((directory, problem))
    return Choice(None, tuple(refused))


def report() -> dict:
    """For ``doctor --json``: the directory in use and each refused one with its reason."""
    choice = select()
    return {
        "directory": choice.directory,
        "refused": [{"path": p, "reason": r} for p, r in choice.refused],
    }


def describe(rep: dict) -> str:
    """One line for doctor's head."""
    text = rep["directory"] or "none usable: rewritten functions are skipped"
    if rep["refused"]:
        text += " (refused: " + "; ".join(r["reason"] for r in rep["refused"]) + ")"
    return text


# --------------------------------------------------------------------------- the file


def _holds_exactly(dir_fd: int, name: str, data: bytes) -> bool:
    """Whether ``name`` in the directory is a regular file (not a link) of exactly ``data``."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        chunks, size = [], 0
        while size <= len(data) and (chunk := os.read(fd, len(data) + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks) == data
    finally:
        os.close(fd)


def _write_at(dir_fd: int, name: str, data: bytes) -> None:
    if _holds_exactly(dir_fd, name, data):
        return
    tmp = f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:
        os.close(fd)
        os.unlink(tmp, dir_fd=dir_fd)
        raise
    os.close(fd)
    os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)  # atomic


_logged: set[tuple] = set()


def write_file(name: str, data: bytes) -> str:
    """Write ``data`` as ``name`` in the first safe candidate directory; return its path.
    Raises :class:`Unsafe` with every candidate's reason when none can hold it."""
    refused: list[tuple[str, str]] = []
    for directory in candidates():
        try:
            dir_fd = open_private(directory)
        except Unsafe as exc:
            refused.append((directory, str(exc)))
            continue
        path = os.path.join(directory, name)
        try:
            _write_at(dir_fd, name, data)
            written = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            named = os.stat(path)
            if (named.st_dev, named.st_ino) != (written.st_dev, written.st_ino):
                raise Unsafe(f"{directory} was replaced while the file was written")
        except OSError as exc:
            refused.append((directory, f"{path}: {exc.strerror or exc}"))
            continue
        except Unsafe as exc:
            refused.append((directory, str(exc)))
            continue
        finally:
            os.close(dir_fd)
        if refused and tuple(refused) not in _logged:
            _logged.add(tuple(refused))
            from vllm_overlap.log import logger

            logger().warning(
                "vllm-overlap: rewritten sources go to %s; refused: %s",
                directory,
                "; ".join(reason for _, reason in refused),
            )
        return path
    raise Unsafe("; ".join(reason for _, reason in refused))
