#!/usr/bin/env python3
"""Check that vllm-overlap's runtime imports and applies under a given vLLM release, without a GPU.

    (run from the checkout: python benchmarks/release_check.py ...; outside any test run: it
    downloads the CUDA torch and its NVIDIA libraries, about 7 GB per release)
    python benchmarks/release_check.py 0.33.0                  # venv, install, probe, name table: one release
    python benchmarks/release_check.py 0.26.0 0.33.0 --markdown report.md
    python benchmarks/release_check.py --names-only            # the name table over every cached wheel

Per release R:

1. the CUDA ``vllm==R`` wheel (``$XDG_CACHE_HOME/vllm-overlap/wheels/vllm-R-*.whl``, downloaded
   there with ``pip download --no-deps`` when missing) names its torch pin (``Requires-Dist:
   torch==X``). A venv ``<venv-root>/venv-R`` is made with ``sys.executable -m venv``;
   ``torch===X`` (exactly that version string: the upstream build, on Linux PyPI's CUDA wheel,
   never a local ``+cpu`` build that a find-links directory may offer) goes in first with
   ``--no-deps`` and the pure-Python packages it imports; if ``import torch``
   then fails for a missing CUDA library (the PyPI torch wheel links cuBLAS, cuDNN, NCCL, ...
   even on a machine without a GPU), torch's own ``Requires-Dist`` (the NVIDIA runtime wheels,
   triton) is installed beside it. The vLLM wheel goes in with ``--no-deps``, then vLLM's
   ``Requires-Dist`` without its GPU kernel packages (``GPU_ONLY``), constrained to the pinned
   torch; a requirement the index cannot satisfy is retried without its version bound (said
   in the report). The plugin's own deps (wrapt, pydantic, PyYAML) too.
2. a probe runs in that venv with the plugin on ``PYTHONPATH`` and ``VLLM_TARGET_DEVICE`` and
   every ``VLLM_OVERLAP*`` variable unset (the built-in config; rewritten sources go to a
   temporary ``VLLM_OVERLAP_CACHE_DIR``): vLLM's platform as detected; (a) every runtime
   module's import; the vLLM names the runtime resolves at run time (LayerName, the parallel
   helper, the aux stream, DBO, the platform gate, the post-load hook, the compile-cache hook);
   (b) ``vllm_overlap.register()``, then each site's target modules imported, and every
   outcome (feature, target, describe()).  A probe whose vLLM base imports fail on a missing
   third-party module installs that module and runs again (at most ``--max-fixes`` times).
3. (c) a table of every vLLM name the plugin uses x release, read from the wheels' sources
   with ``zipfile`` and ``ast`` (no install): present / absent / lazy / a semantic check.

Nothing here writes outside ``--venv-root`` and the wheel directory (and a temporary
directory for the rewritten sources). Exit status: 0 when every release's runtime imports and
no rewrite ends in ``skipped: internal error``, else 1.
"""

from __future__ import annotations

import argparse
import ast
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import time
import zipfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vllm_overlap.cli.compat import cache_base, cached_wheels, find_wheel
from vllm_overlap.cli.compat import wheel_dir as default_wheel_dir
from vllm_overlap.runtime import vllm_names

# --------------------------------------------------------------------------------------------
# paths and wheels


def default_venv_root() -> str:
    return os.path.join(cache_base(), "vllm-overlap", "release-check")


def default_plugin_root() -> str | None:
    """The checkout holding ``vllm_overlap``: the current directory, or this script's
    directory or its parent (the script kept in the repository, e.g. ``tools/``)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for cand in (os.getcwd(), here, os.path.dirname(here)):
        if os.path.isdir(os.path.join(cand, "vllm_overlap")):
            return cand
    return None


def release_key(release: str):
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"[.-]", release))


def cached_releases(wheel_dir: str) -> list[str]:
    out = set()
    for path in glob.glob(os.path.join(wheel_dir, "vllm-*.whl")):
        out.add(os.path.basename(path).split("-")[1])
    return sorted(out, key=release_key)


def wheel_metadata(path: str) -> str:
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return z.read(name).decode("utf-8")


def requires_dist(metadata: str) -> list[str]:
    return [line[len("Requires-Dist: ") :] for line in metadata.splitlines() if line.startswith("Requires-Dist: ")]


def torch_pin(metadata: str) -> str:
    for req in requires_dist(metadata):
        m = re.match(r"torch\s*==\s*([0-9][^;,\s]*)", req)
        if m:
            return m.group(1)
    raise ValueError("the vLLM wheel pins no torch version")


# --------------------------------------------------------------------------------------------
# step 1: the venv

# vLLM requirements that are GPU kernels / media codecs, never imported by the modules the
# plugin touches on a machine without a GPU; torch & co. are installed separately.
GPU_ONLY = {
    "torch",
    "torchaudio",
    "torchvision",
    "torchcodec",
    "pynvvideocodec",
    "flashinfer-python",
    "flashinfer-cubin",
    "flashinfer-jit-cache",
    "apache-tvm-ffi",
    "tilelang",
    "nvidia-cudnn-frontend",
    "nvtx",
    "fastsafetensors",
    "instanttensor",
    "nvidia-cutlass-dsl",
    "quack-kernels",
    "tokenspeed-mla",
    "humming-kernels",
    "xformers",
    "deep-gemm",
    "deep-ep",
    "cupy-cuda12x",
    "ray",
    "vllm-flash-attn",
}
TORCH_PURE_DEPS = ["typing_extensions", "sympy", "networkx", "jinja2", "fsspec", "filelock", "mpmath", "markupsafe"]
PLUGIN_DEPS = ["wrapt>=1.14", "pydantic>=2", "PyYAML>=6"]
# import name -> distribution, where they differ (for the ModuleNotFoundError loop)
MODULE_DIST = {
    "cv2": "opencv-python-headless",
    "yaml": "PyYAML",
    "zmq": "pyzmq",
    "PIL": "pillow",
    "google": "protobuf",
    "cpuinfo": "py-cpuinfo",
    "sklearn": "scikit-learn",
    "dateutil": "python-dateutil",
    "dotenv": "python-dotenv",
    "jwt": "PyJWT",
    "pythonjsonlogger": "python-json-logger",
    "multipart": "python-multipart",
    "attr": "attrs",
    "lm_format_enforcer": "lm-format-enforcer",
    "openai_harmony": "openai-harmony",
}


def log(msg: str) -> None:
    print(f"[release_check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], logfile: str, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    with open(logfile, "a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}\nrc={proc.returncode}\n")
    return proc


def pip(venv: str, args: list[str], logfile: str) -> subprocess.CompletedProcess:
    return run([venv_python(venv), "-m", "pip", "install", "--disable-pip-version-check", *args], logfile)


def venv_python(venv: str) -> str:
    return os.path.join(venv, "bin", "python")


def probe_env(plugin_root: str, rewritten_dir: str) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if k != "VLLM_TARGET_DEVICE" and not k.startswith("VLLM_OVERLAP") and k != "PYTHONPATH"
    }
    env["PYTHONPATH"] = plugin_root
    env["VLLM_OVERLAP_CACHE_DIR"] = rewritten_dir
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def filtered_requirements(metadata: str, python: str) -> list[str]:
    """vLLM's Requires-Dist for this platform, without extras and GPU_ONLY packages (marker
    evaluation runs in the venv's interpreter, which has ``packaging`` once pip is there)."""
    code = textwrap.dedent(
        """
        import json, sys
        from packaging.requirements import Requirement
        out = []
        for line in json.load(sys.stdin):
            r = Requirement(line)
            if r.marker and not r.marker.evaluate({"extra": ""}):
                continue
            r.marker = None
            out.append((r.name, str(r)))
        print(json.dumps(out))
        """
    )
    try:
        proc = subprocess.run(
            [python, "-c", code], input=json.dumps(requires_dist(metadata)), capture_output=True, text=True, check=True
        )
        pairs = json.loads(proc.stdout)
    except (subprocess.CalledProcessError, json.JSONDecodeError):  # no packaging: crude split
        pairs = []
        for line in requires_dist(metadata):
            if "extra ==" in line:
                continue
            req = line.split(";")[0].strip()
            pairs.append((re.split(r"[\s\[<>=!~]", req, maxsplit=1)[0], req))
    norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()  # noqa: E731
    return [req for name, req in pairs if norm(name) not in GPU_ONLY]


def build_venv(release: str, wheel: str, venv_root: str, rebuild: bool = False) -> dict:
    """Make (or reuse) ``venv-<release>`` with the pinned torch, the vLLM wheel and its
    non-GPU deps; return what was done."""
    meta = wheel_metadata(wheel)
    pin = torch_pin(meta)
    venv = os.path.join(venv_root, f"venv-{release}")
    logfile = os.path.join(venv_root, f"install-{release}.log")
    stamp = os.path.join(venv, ".release-check.json")
    info = {
        "release": release,
        "wheel": wheel,
        "torch_pin": pin,
        "venv": venv,
        "log": logfile,
        "relaxed": [],
        "torch_deps": "pure-python only",
    }
    if os.path.exists(stamp) and not rebuild:
        with open(stamp) as fh:
            done = json.load(fh)
        if done.get("wheel") == wheel:
            log(f"{release}: reusing {venv}")
            return done
    os.makedirs(venv_root, exist_ok=True)
    t0 = time.time()
    log(f"{release}: venv {venv} (python {sys.version.split()[0]}), torch=={pin}")
    subprocess.run([sys.executable, "-m", "venv", "--clear", venv], check=True)
    py = venv_python(venv)
    pip(venv, ["-q", "-U", "pip", "packaging"], logfile)
    proc = pip(venv, ["--no-deps", f"torch==={pin}", *TORCH_PURE_DEPS], logfile)
    if proc.returncode:
        raise RuntimeError(f"torch=={pin} did not install: see {logfile}")
    check = run([py, "-c", "import torch"], logfile)
    if check.returncode:
        missing = re.findall(r"(lib[\w.+-]+\.so[\w.]*): cannot open shared object", check.stderr)
        log(
            f"{release}: CUDA torch does not import without its NVIDIA libraries "
            f"({', '.join(missing) or 'see log'}); installing torch's Requires-Dist"
        )
        torch_meta = run(
            [py, "-c", "import importlib.metadata as m, json; print(json.dumps(m.requires('torch') or []))"], logfile
        )
        reqs = [r for r in json.loads(torch_meta.stdout) if "extra ==" not in r]
        proc = pip(venv, [*reqs, f"torch==={pin}"], logfile)
        info["torch_deps"] = "torch's Requires-Dist (NVIDIA runtime wheels, triton): " + (
            ", ".join(missing) or "import failed"
        )
        check = run([py, "-c", "import torch"], logfile)
        if check.returncode:
            raise RuntimeError(f"import torch still fails: {check.stderr.strip().splitlines()[-1]}")
    proc = pip(venv, ["--no-deps", wheel], logfile)
    if proc.returncode:
        raise RuntimeError(f"the vLLM wheel did not install: see {logfile}")
    reqs = filtered_requirements(meta, py) + PLUGIN_DEPS
    constraints = os.path.join(venv, "release-check-constraints.txt")
    with open(constraints, "w") as fh:
        fh.write(f"torch==={pin}\n")
    for _ in range(8):
        proc = pip(venv, ["-c", constraints, *reqs], logfile)
        if proc.returncode == 0:
            break
        m = re.search(r"No matching distribution found for ([A-Za-z0-9_.\-\[\]]+)", proc.stderr)
        if not m:
            raise RuntimeError(f"vLLM's dependencies did not install: see {logfile}")
        name = re.split(r"[\s<>=!~;]", m.group(1), maxsplit=1)[0]
        base = re.sub(r"\[.*\]", "", name).lower()
        hit = [r for r in reqs if re.sub(r"[\[<>=!~ ].*", "", r).lower() == base]
        if not hit or hit[0] == name:
            raise RuntimeError(f"{name} cannot be installed from this index: see {logfile}")
        info["relaxed"].append(f"{hit[0]} -> {name} (the index has no version in range)")
        reqs = [name if r == hit[0] else r for r in reqs]
    else:
        raise RuntimeError(f"vLLM's dependencies did not install: see {logfile}")
    info["install_s"] = round(time.time() - t0)
    info["size"] = _du(venv)
    with open(stamp, "w") as fh:
        json.dump(info, fh, indent=1)
    log(f"{release}: installed in {info['install_s']} s ({info['size']})")
    return info


def _du(path: str) -> str:
    try:
        return subprocess.run(["du", "-sh", path], capture_output=True, text=True).stdout.split()[0]
    except Exception:
        return "?"


# --------------------------------------------------------------------------------------------
# step 2: the probe (runs inside the venv)

PROBE = r'''
import importlib, json, os, sys, traceback, warnings
warnings.filterwarnings("ignore")
out = {"base": {}, "imports": {}, "lookups": {}, "register": None, "targets": {}, "outcomes": [],
       "hooks": {}, "ops": {}}

def tail(exc, n=8):
    lines = traceback.format_exception(type(exc), exc, exc.__traceback__)
    text = "".join(lines).rstrip().splitlines()
    return "\n".join(text[-n:])

def attempt(fn):
    try:
        return {"ok": True, "value": fn()}
    except BaseException as exc:  # SystemExit from a strict stop included
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "tail": tail(exc),
                "missing": getattr(exc, "name", None) if isinstance(exc, ModuleNotFoundError) else None}

import torch
out["torch"] = torch.__version__
import vllm
out["vllm"] = vllm.__version__
out["python"] = sys.version.split()[0]
def platform():
    from vllm.platforms import current_platform as p
    return {"class": type(p).__name__, "enum": str(getattr(p, "_enum", "?")),
            "device_type": getattr(p, "device_type", "?"), "is_cuda_alike": p.is_cuda_alike()}
out["platform"] = attempt(platform)
for m in ("vllm.platforms", "vllm.utils.torch_utils", "vllm.forward_context",
          "vllm.model_executor.layers.linear", "vllm.model_executor.model_loader.utils"):
    out["base"][m] = attempt(lambda m=m: importlib.import_module(m).__name__)

# (a) the runtime's modules
MODULES = ["vllm_overlap.runtime", "vllm_overlap.runtime.module_namespaces", "vllm_overlap.runtime.site_runtime",
           "vllm_overlap.runtime.layer_registry", "vllm_overlap.runtime.gates", "vllm_overlap.runtime.gdn_fuse",
           "vllm_overlap.runtime.deepseek_post_load", "vllm_overlap.runtime.census",
           "vllm_overlap.runtime.streams", "vllm_overlap.testing.layer_builders", "vllm_overlap.testing.layer_bench"]
import pkgutil, vllm_overlap.runtime as _rt
for info in pkgutil.iter_modules(_rt.__path__):  # any module added later
    name = "vllm_overlap.runtime." + info.name
    if name not in MODULES:
        MODULES.append(name)
for m in MODULES:
    out["imports"][m] = attempt(lambda m=m: importlib.import_module(m).__file__)

# what the runtime resolves in vLLM at run time (each falls back quietly when absent)
def lookups():
    res = {}
    from vllm_overlap.runtime import layers, gates
    from vllm_overlap.runtime import streams
    from vllm_overlap import log
    res["layers.LayerNameType"] = f"{layers.LayerNameType.__module__}.{layers.LayerNameType.__qualname__}"
    res["layers.encode_layer_name"] = f"{layers.encode_layer_name.__module__}.{layers.encode_layer_name.__name__}"
    res["layers.is_forward_context_available"] = layers.is_forward_context_available.__module__
    res["streams._parallel_impl()"] = (lambda f: f"{f.__module__}.{f.__name__}")(streams._parallel_impl())
    res["streams.get_aux_stream()"] = repr(streams.get_aux_stream())
    res["streams.in_micro_batch_thread()"] = repr(streams.in_micro_batch_thread())
    res["streams dbo_enabled from"] = streams._dbo_enabled.__module__
    res["gates.overlap_possible()"] = repr(gates.overlap_possible())
    res["log.logger()"] = type(log.logger()).__name__ + " " + log.logger().name
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod, MergedColumnParallelLinear
    res["linear.UnquantizedLinearMethod, MergedColumnParallelLinear"] = "importable"
    return res
lk = attempt(lookups)
out["lookups"] = lk["value"] if lk["ok"] else {"error": lk["error"], "tail": lk["tail"]}

# (b) register, import every site's target modules, outcomes
from vllm_overlap.sites import SITES
reg = attempt(lambda: __import__("vllm_overlap").register())
out["register"] = reg
modules = sorted({t.module for s in SITES.values() for t in s.targets})
def absent_module(module, result):
    """The import failed because this release has no such module (or package above it)."""
    missing = result.get("missing") or ""
    return bool(missing) and (module == missing or module.startswith(missing + "."))

for m in modules:
    out["targets"][m] = attempt(lambda m=m: importlib.import_module(m).__name__)
for m in modules:  # once more: a failed package import can leave subpackages importable
    r = out["targets"][m]
    if not r["ok"] and not absent_module(m, r):
        again = attempt(lambda m=m: importlib.import_module(m).__name__)
        r["retry"] = "ok" if again["ok"] else again["error"]
# the same anchors matched against the wheel's sources (vllm-overlap compat): what a GPU
# machine, where every target module imports, would apply
try:
    from vllm_overlap.cli import compat
    rows = compat.release_rows(vllm.__version__, compat.wheel_reader(os.environ["RELCHECK_WHEEL"]))
    out["static"] = {f"{r['module']}.{r['target']}": r["result"] for r in rows}
except Exception as exc:
    out["static"] = {"error": f"{type(exc).__name__}: {exc}"}
import vllm.model_executor.model_loader.utils as lu
from vllm_overlap.runtime import cache_key, hooks
out["hooks"]["model_loader.utils.process_weights_after_loading wrapped"] = hooks.is_ours(
    lu.process_weights_after_loading)
rebound = []
for name, mod in list(sys.modules.items()):
    ns = getattr(mod, "__dict__", None)
    if name.startswith("vllm.") and isinstance(ns, dict) and hooks.is_ours(ns.get("process_weights_after_loading")):
        rebound.append(name)
out["hooks"]["modules bound to the wrapped step"] = rebound
def compile_cache_key():
    import vllm.config.vllm  # noqa: F401  (its hook mixes the key in)
    return cache_key.describe()
out["hooks"]["compile-cache key"] = attempt(compile_cache_key)
from vllm_overlap import outcomes
for (feature, target), o in outcomes.outcomes.items():
    row = {"feature": feature, "target": target, "describe": o.describe(),
           "static": out["static"].get(target, "?")}
    if o.status == outcomes.PENDING:  # its module never finished importing here
        module = next(t.module for s in SITES.values() for t in s.targets if str(t) == target)
        r = out["targets"].get(module, {})
        if not r.get("ok"):
            why = r.get("error", "")
            row["note"] = ("module not in this release" if absent_module(module, r)
                           else f"module failed to import: {why}")
    out["outcomes"].append(row)
from vllm_overlap.runtime import site_runtime
for site in SITES.values():
    if site.dynamo == "op":
        if site_runtime.has_op(site.op):
            packet = getattr(torch.ops.vllm_overlap, site.op)
            out["ops"][site.op] = str(packet.default._schema)
        else:
            out["ops"][site.op] = "not registered"
from vllm_overlap.runtime import plugin
out["summary_line"] = attempt(plugin.summary_line)
print("@@PROBE@@" + json.dumps(out, default=str))
'''

BASE_MODULES_OK = (
    "vllm.platforms",
    "vllm.utils.torch_utils",
    "vllm.forward_context",
    "vllm.model_executor.layers.linear",
    "vllm.model_executor.model_loader.utils",
)


def run_probe(venv: str, plugin_root: str, logfile: str, wheel: str, max_fixes: int = 5) -> dict:
    """Run the probe; when a base vLLM import fails on a missing third-party module, install
    it and run again."""
    fixes = []
    with tempfile.TemporaryDirectory(prefix="vllm-overlap-relcheck-") as tmp:
        os.chmod(tmp, 0o700)
        rewritten = os.path.join(tmp, "rewritten")
        script = os.path.join(tmp, "probe.py")
        with open(script, "w") as fh:
            fh.write(PROBE)
        for _ in range(max_fixes + 1):
            env = probe_env(plugin_root, rewritten)
            env["RELCHECK_WHEEL"] = wheel
            proc = run([venv_python(venv), script], logfile, env=env)
            marker = [line for line in proc.stdout.splitlines() if line.startswith("@@PROBE@@")]
            if not marker:
                m = re.search(r"No module named '([\w.]+)'", proc.stderr)
                if m and not m.group(1).startswith(("vllm", "torch")):
                    dist = MODULE_DIST.get(m.group(1).split(".")[0], m.group(1).split(".")[0])
                    fixes.append(dist)
                    log(f"probe: vLLM needs {m.group(1)}; installing {dist}")
                    pip(venv, [dist], logfile)
                    continue
                return {
                    "crashed": True,
                    "stderr_tail": "\n".join(proc.stderr.strip().splitlines()[-15:]),
                    "fixes": fixes,
                }
            result = json.loads(marker[-1][len("@@PROBE@@") :])
            missing = [v.get("missing") for v in result["base"].values() if not v["ok"] and v.get("missing")]
            missing = [m for m in missing if not m.startswith(("vllm", "torch"))]
            if missing and len(fixes) < max_fixes:
                dist = MODULE_DIST.get(missing[0].split(".")[0], missing[0].split(".")[0])
                fixes.append(dist)
                log(f"probe: vLLM needs {missing[0]}; installing {dist}")
                pip(venv, [dist], logfile)
                continue
            result["fixes"] = fixes
            result["stderr_tail"] = "\n".join(proc.stderr.strip().splitlines()[-6:])
            return result
    return {"crashed": True, "stderr_tail": "too many missing modules", "fixes": fixes}


# --------------------------------------------------------------------------------------------
# step 3: the name table, from the wheels' sources

# (label, used by, module, kind, name, extra)
#   attr:    module-level name (def, class, assignment, import; lazy __getattr__ counts)
#   member:  Class.member: a method, class attribute/field, or ``self.member =`` in the class or
#            a base class defined in the same module
#   params:  a function / method (``Class.method``) accepting every parameter in ``extra``
#   uses:    the function's body mentions ``extra``
#   binds:   the module imports ``name`` by name (the post-load hook rebinds it there)
NAMES = [
    # every name the runtime reads (vllm_names: one table, with what the runtime does without it)
    *(
        (
            f"{n.module.rsplit('.', 1)[-1]}.{n.name}",
            f"runtime; without: {n.without}",
            n.module,
            "member" if "." in n.name else "attr",
            n.name,
            None,
        )
        for n in vllm_names.NAMES
    ),
    ("Platform.is_cuda_alike", "gates", "vllm.platforms.interface", "member", "Platform.is_cuda_alike", None),
    ("Platform.device_type", "cli doctor", "vllm.platforms.interface", "member", "Platform.device_type", None),
    ("Platform._enum", "cli doctor", "vllm.platforms.interface", "member", "Platform._enum", None),
    (
        "  (op_name, op_func, mutates_args, fake_impl, target_lib)",
        "site_runtime",
        "vllm.utils.torch_utils",
        "params",
        "direct_register_custom_op",
        ("op_name", "op_func", "mutates_args", "fake_impl", "target_lib"),
    ),
    (
        "torch_utils.set_default_torch_dtype",
        "layer_builders",
        "vllm.utils.torch_utils",
        "attr",
        "set_default_torch_dtype",
        None,
    ),
    (
        "  (default_fn, aux_fns, start_event, done_events, aux_streams, enable)",
        "streams",
        "vllm.utils.multi_stream_utils",
        "params",
        "execute_in_parallel",
        ("default_fn", "aux_fns", "start_event", "done_events", "aux_streams", "enable"),
    ),
    (
        "breakable_cudagraph.eager_break_during_capture",
        "not called (decorates V3.2 _fused_attention 0.25-0.27)",
        "vllm.compilation.breakable_cudagraph",
        "attr",
        "eager_break_during_capture",
        None,
    ),
    (
        "ForwardContext.no_compile_layers",
        "layers",
        "vllm.forward_context",
        "member",
        "ForwardContext.no_compile_layers",
        None,
    ),
    (
        "  (input_size, output_sizes, bias, quant_config, params_dtype, disable_tp, prefix)",
        "gdn_fuse",
        "vllm.model_executor.layers.linear",
        "params",
        "MergedColumnParallelLinear.__init__",
        ("input_size", "output_sizes", "bias", "quant_config", "params_dtype", "disable_tp", "prefix"),
    ),
    (
        "  .output_size_per_partition",
        "gdn_fuse, layers",
        "vllm.model_executor.layers.linear",
        "member",
        "MergedColumnParallelLinear.output_size_per_partition",
        None,
    ),
    (
        "  .output_sizes",
        "gdn_fuse",
        "vllm.model_executor.layers.linear",
        "member",
        "MergedColumnParallelLinear.output_sizes",
        None,
    ),
    (
        "  .tp_size / .tp_rank",
        "gdn_fuse",
        "vllm.model_executor.layers.linear",
        "member",
        "MergedColumnParallelLinear.tp_size,MergedColumnParallelLinear.tp_rank",
        None,
    ),
    (
        "  .input_size / .quant_method",
        "gdn_fuse",
        "vllm.model_executor.layers.linear",
        "member",
        "MergedColumnParallelLinear.input_size,MergedColumnParallelLinear.quant_method",
        None,
    ),
    (
        "ReplicatedLinear.output_size",
        "layers.per_rank_width",
        "vllm.model_executor.layers.linear",
        "member",
        "ReplicatedLinear.output_size",
        None,
    ),
    (
        "  (model, model_config, target_device)",
        "layer_builders",
        "vllm.model_executor.model_loader.utils",
        "params",
        "process_weights_after_loading",
        ("model", "model_config", "target_device"),
    ),
    (
        "  bound by name in base_loader",
        "plugin post-load hook",
        "vllm.model_executor.model_loader.base_loader",
        "binds",
        "process_weights_after_loading",
        None,
    ),
    (
        "  bound by name in weight_cache.daemon",
        "plugin post-load hook",
        "vllm.model_executor.model_loader.weight_cache.daemon",
        "binds",
        "process_weights_after_loading",
        None,
    ),
    (
        "  bound by name in weight_cache.ipc_loader",
        "plugin post-load hook",
        "vllm.model_executor.model_loader.weight_cache.ipc_loader",
        "binds",
        "process_weights_after_loading",
        None,
    ),
    (
        "config.set_current_vllm_config",
        "layer_builders, layer_bench",
        "vllm.config",
        "attr",
        "set_current_vllm_config",
        None,
    ),
    ("config.ModelConfig / VllmConfig", "layer_bench", "vllm.config", "attr", "ModelConfig,VllmConfig", None),
    (
        "distributed.init_distributed_environment",
        "layer_bench",
        "vllm.distributed",
        "attr",
        "init_distributed_environment",
        None,
    ),
    (
        "distributed.initialize_model_parallel",
        "layer_bench",
        "vllm.distributed",
        "attr",
        "initialize_model_parallel",
        None,
    ),
    (
        "parallel_state.model_parallel_is_initialized",
        "layer_bench",
        "vllm.distributed.parallel_state",
        "attr",
        "model_parallel_is_initialized",
        None,
    ),
    (
        "rotary_embedding.get_rope",
        "layer_builders",
        "vllm.model_executor.layers.rotary_embedding",
        "attr",
        "get_rope",
        None,
    ),
    (
        "  (head_size, max_position, rope_parameters, is_neox_style)",
        "layer_builders",
        "vllm.model_executor.layers.rotary_embedding",
        "params",
        "get_rope",
        ("max_position", "rope_parameters", "is_neox_style"),
    ),
    (
        "qwen_gdn_linear_attn.QwenGatedDeltaNetAttention",
        "site_layers, gdn target",
        "vllm.model_executor.layers.mamba.gdn.qwen_gdn_linear_attn",
        "attr",
        "QwenGatedDeltaNetAttention",
        None,
    ),
    (
        "  __init__(config, vllm_config, prefix, gqa_interleaved_layout)",
        "layer_builders",
        "vllm.model_executor.layers.mamba.gdn.qwen_gdn_linear_attn",
        "params",
        "QwenGatedDeltaNetAttention.__init__",
        ("prefix", "gqa_interleaved_layout"),
    ),
    (
        "gdn_linear_attn.GatedDeltaNetAttention (0.20-0.21)",
        "gdn target",
        "vllm.model_executor.layers.mamba.gdn_linear_attn",
        "attr",
        "GatedDeltaNetAttention",
        None,
    ),
    (
        "deepseek_v2.Indexer",
        "site_layers, legacy target",
        "vllm.model_executor.models.deepseek_v2",
        "attr",
        "Indexer",
        None,
    ),
    (
        "deepseek_v2.DeepseekV2MLAAttention",
        "layer_builders",
        "vllm.model_executor.models.deepseek_v2",
        "attr",
        "DeepseekV2MLAAttention",
        None,
    ),
    (
        "mla.MultiHeadLatentAttentionWrapper",
        "legacy target",
        "vllm.model_executor.layers.mla",
        "attr",
        "MultiHeadLatentAttentionWrapper",
        None,
    ),
    (
        "deepseek_v32.attention.DeepseekV32Attention",
        "site_layers, v32 target",
        "vllm.models.deepseek_v32.attention",
        "attr",
        "DeepseekV32Attention",
        None,
    ),
    (
        "  __init__(vllm_config, config, prefix, topk_indices_buffer, attn_backend)",
        "layer_builders",
        "vllm.models.deepseek_v32.attention",
        "params",
        "DeepseekV32Attention.__init__",
        ("topk_indices_buffer", "attn_backend"),
    ),
    (
        "deepseek_v32.nvidia.attention.DeepseekV32Attention (0.25-0.26)",
        "v32 target",
        "vllm.models.deepseek_v32.nvidia.attention",
        "attr",
        "DeepseekV32Attention",
        None,
    ),
    (
        "deepseek_v32.amd.rocm.DeepseekV32MLAAttention",
        "v32 ROCm target",
        "vllm.models.deepseek_v32.amd.rocm",
        "attr",
        "DeepseekV32MLAAttention",
        None,
    ),
    (
        "cpu_mla.CPUMLABackend",
        "site_layers (CPU)",
        "vllm.v1.attention.backends.mla.cpu_mla",
        "attr",
        "CPUMLABackend",
        None,
    ),
    ("vllm.LLM / SamplingParams", "llm_runner", "vllm", "attr", "LLM,SamplingParams", None),
    (
        "models.registry.ModelRegistry",
        "cli doctor --model",
        "vllm.model_executor.models.registry",
        "attr",
        "ModelRegistry",
        None,
    ),
    (
        "UnquantizedLinearMethod._gemm_impl",
        "stream_safety",
        "vllm.model_executor.layers.linear",
        "member",
        "UnquantizedLinearMethod._gemm_impl",
        None,
    ),
]


class WheelSource:
    def __init__(self, path: str):
        self.zip = zipfile.ZipFile(path)
        self.names = set(self.zip.namelist())
        self._trees: dict[str, ast.Module | None] = {}

    def tree(self, module: str) -> ast.Module | None:
        if module not in self._trees:
            base = module.replace(".", "/")
            tree = None
            for cand in (base + ".py", base + "/__init__.py"):
                if cand in self.names:
                    tree = ast.parse(self.zip.read(cand).decode("utf-8"))
                    break
            self._trees[module] = tree
        return self._trees[module]

    def is_package(self, module: str) -> bool:
        return module.replace(".", "/") + "/__init__.py" in self.names


def _runtime_statements(body):
    """Top-level statements as run (into if/try/with bodies, skipping ``if TYPE_CHECKING``)."""
    for node in body:
        if isinstance(node, ast.If):
            test = ast.unparse(node.test)
            if "TYPE_CHECKING" in test:
                yield from _runtime_statements(node.orelse)
                continue
            yield from _runtime_statements(node.body)
            yield from _runtime_statements(node.orelse)
        elif isinstance(node, ast.Try):
            for part in (node.body, node.orelse, node.finalbody, *[h.body for h in node.handlers]):
                yield from _runtime_statements(part)
        elif isinstance(node, ast.With):
            yield from _runtime_statements(node.body)
        else:
            yield node


def _resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str:
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join([*base, target] if target else base)


def _defined(src: "WheelSource", module: str, name: str, depth: int = 0) -> str | None:
    """How ``name`` is bound at module level: def / class / assign / import / lazy (a module
    ``__getattr__`` naming it), following ``from x import *``; None if it is not."""
    tree = src.tree(module)
    if tree is None:
        return None
    lazy = False
    stars = []
    for node in _runtime_statements(tree.body):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if node.name == name:
                return "class" if isinstance(node, ast.ClassDef) else "def"
            if node.name == "__getattr__":
                lazy = True
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                for n in ast.walk(t):
                    if isinstance(n, ast.Name) and n.id == name:
                        return "assign"
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
            return "assign"
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                if alias.name == "*" and isinstance(node, ast.ImportFrom):
                    stars.append(
                        _resolve_relative(module, src.is_package(module), node.level, node.module)
                        if node.level
                        else node.module
                    )
                elif (alias.asname or alias.name.split(".")[0]) == name:
                    src_mod = node.module if isinstance(node, ast.ImportFrom) else alias.name
                    return f"import from {'.' * getattr(node, 'level', 0)}{src_mod}"
    if depth < 3:
        for star in stars:
            if _defined(src, star, name, depth + 1):
                return f"star import from {star}"
    if lazy and re.search(rf"[\"']{re.escape(name)}[\"']", ast.unparse(tree)):
        return "lazy"
    return None


def _class(tree: ast.Module, name: str) -> ast.ClassDef | None:
    return next((n for n in _runtime_statements(tree.body) if isinstance(n, ast.ClassDef) and n.name == name), None)


def _class_has(tree: ast.Module, cls_name: str, member: str, seen=None) -> bool:
    seen = seen or set()
    if cls_name in seen:
        return False
    seen.add(cls_name)
    cls = _class(tree, cls_name)
    if cls is None:
        return False
    for node in cls.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == member:
            return True
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == member:
            return True
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == member for t in node.targets):
            return True
    for node in ast.walk(cls):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and node.attr == member:
            if isinstance(node.value, ast.Name) and node.value.id == "self":
                return True
    return any(isinstance(b, ast.Name) and _class_has(tree, b.id, member, seen) for b in cls.bases)


def _function(tree: ast.Module, qualname: str):
    *path, name = qualname.split(".")
    body = list(_runtime_statements(tree.body))
    for part in path:
        cls = next((n for n in body if isinstance(n, ast.ClassDef) and n.name == part), None)
        if cls is None:
            return None
        body = cls.body
    return next((n for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name), None)


def check_name(src: WheelSource, module: str, kind: str, name: str, extra) -> str:
    tree = src.tree(module)
    if tree is None:
        return "no module"
    if kind == "attr":
        found = [(_defined(src, module, n) or "") for n in name.split(",")]
        if all(found):
            return "lazy" if "lazy" in found else "present"
        return (
            "absent"
            if not any(found)
            else "partly: " + ",".join(n for n, f in zip(name.split(","), found) if not f) + " absent"
        )
    if kind == "member":
        missing = []
        for item in name.split(","):
            cls, member = item.split(".")
            if _class(tree, cls) is None:
                return f"no class {cls}"
            if not _class_has(tree, cls, member):
                missing.append(member)
        return "present" if not missing else "absent: " + ",".join(missing)
    if kind in ("params", "uses"):
        func = _function(tree, name)
        if func is None:
            return "no function"
        if kind == "uses":
            return "yes" if extra in ast.unparse(func) else "no"
        a = func.args
        params = {p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs)}
        missing = [p for p in extra if p not in params]
        if missing and (a.kwarg is not None):
            return "**kwargs (" + ",".join(missing) + " not named)"
        return "present" if not missing else "missing: " + ",".join(missing)
    if kind == "binds":
        for node in _runtime_statements(tree.body):
            if isinstance(node, ast.ImportFrom) and any(al.name == name for al in node.names):
                return "binds"
        return "no" if name not in ast.unparse(tree) else "module attr only"
    raise ValueError(kind)


def name_table(releases: list[str], wheel_dir: str) -> tuple[list[str], list[dict]]:
    rows = [{"name": label, "used_by": used, "module": module, "cells": {}} for label, used, module, *_ in NAMES]
    for release in releases:
        src = WheelSource(find_wheel(release, wheel_dir, download=False))
        for row, (_, _, module, kind, name, extra) in zip(rows, NAMES):
            try:
                row["cells"][release] = check_name(src, module, kind, name, extra)
            except Exception as exc:  # a source this parser cannot read
                row["cells"][release] = f"error: {type(exc).__name__}"
    return releases, rows


def plugin_class_names(plugin_root: str) -> dict[str, list[str]]:
    """vLLM class / function names the runtime matches by name (``stream_safety``'s allowlist
    and deny list), read from its source without importing it: {dict name: [names]}."""
    path = os.path.join(plugin_root, "vllm_overlap", "runtime", "stream_safety.py")
    if not os.path.exists(path):
        return {}
    with open(path) as fh:
        tree = ast.parse(fh.read())
    out: dict[str, list[str]] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            target = node.targets[0].id
            if target in ("SAFE_METHODS", "SAFE_KERNELS", "UNSAFE"):
                names = [
                    c.value
                    for c in ast.walk(node.value)
                    if isinstance(c, ast.Constant)
                    and isinstance(c.value, str)
                    and re.fullmatch(r"[A-Z][A-Za-z0-9_]+", c.value)
                ]
                out[target] = list(dict.fromkeys(names))
            elif target == "FLASHINFER_BF16" and isinstance(node.value, ast.Constant):
                out["FLASHINFER_BF16 (function)"] = [node.value.value]
    return out


def defined_names(wheel: str) -> set[str]:
    """Every class and function name defined anywhere in the wheel's Python sources."""
    names: set[str] = set()
    pattern = re.compile(rb"^\s*(?:class|def)\s+([A-Za-z_][A-Za-z0-9_]*)", re.M)
    with zipfile.ZipFile(wheel) as z:
        for n in z.namelist():
            if n.startswith("vllm/") and n.endswith(".py"):
                names.update(m.decode() for m in pattern.findall(z.read(n)))
    return names


def class_name_table(releases: list[str], wheel_dir: str, plugin_root: str) -> tuple[list[str], list[dict]]:
    groups = plugin_class_names(plugin_root)
    defined = {r: defined_names(find_wheel(r, wheel_dir, download=False)) for r in releases}
    rows = []
    for group, names in groups.items():
        for name in names:
            rows.append(
                {
                    "name": name,
                    "used_by": f"stream_safety.{group}",
                    "cells": {r: "present" if name in defined[r] else "absent" for r in releases},
                }
            )
    return releases, rows


def _abbrev(cell: str) -> str:
    if cell.startswith("missing: "):
        return "-arg " + cell[len("missing: ") :]
    if cell.startswith("absent: "):
        return "-"
    if cell.startswith("no class "):
        return "-cls"
    return {
        "present": "+",
        "absent": "-",
        "no module": "-mod",
        "no class": "-cls",
        "yes": "+",
        "no": "-",
        "lazy": "+lazy",
        "binds": "+",
        "no function": "-fn",
    }.get(cell, cell)


def name_table_text(releases, rows, markdown: bool = False) -> str:
    short = lambda r: r  # noqa: E731
    if markdown:
        lines = [
            "| name | used by | " + " | ".join(short(r) for r in releases) + " |",
            "|---|---|" + "---|" * len(releases),
        ]
        for row in rows:
            lines.append(
                f"| `{row['name'].strip()}`{' (sub-check)' if row['name'].startswith('  ') else ''} "
                f"| {row['used_by']} | "
                + " | ".join(_abbrev(row["cells"][r]) for r in releases)
                + " |"
            )
        return "\n".join(lines)
    width = max(len(r["name"]) for r in rows)
    cols = [max(len(r), *(len(_abbrev(row["cells"][r])) for row in rows)) for r in releases]
    out = [f"{'name':<{width}}  " + "  ".join(f"{r:<{c}}" for r, c in zip(releases, cols))]
    for row in rows:
        out.append(
            f"{row['name']:<{width}}  " + "  ".join(f"{_abbrev(row['cells'][r]):<{c}}" for r, c in zip(releases, cols))
        )
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# report


def release_ok(probe: dict) -> bool:
    if probe.get("crashed"):
        return False
    if not all(v["ok"] for v in probe["imports"].values()) or "error" in probe["lookups"]:
        return False
    if not probe["register"]["ok"]:
        return False
    return not any("internal error" in o["describe"] for o in probe["outcomes"])


def _indent(text: str, pad: str = "      ") -> list[str]:
    return [pad + line for line in text.splitlines()]


def report_text(info: dict, probe: dict, markdown: bool = False) -> str:
    """One release's report: plain text; with ``markdown``, the same text in a fenced block
    followed by the outcomes as a table."""
    out = []
    if probe.get("crashed"):
        out += ["-- probe crashed", *_indent(probe["stderr_tail"])]
        return "```text\n" + "\n".join(out) + "\n```" if markdown else "\n".join(out)
    plat = probe["platform"]
    out.append(f"vLLM {probe['vllm']}, torch {probe['torch']} (pin {info.get('torch_pin')}), python {probe['python']}")
    out.append("platform: " + (json.dumps(plat["value"]) if plat["ok"] else plat["error"]))
    if info.get("torch_deps"):
        out.append(f"torch deps: {info['torch_deps']}")
    if info.get("relaxed"):
        out.append("relaxed requirements: " + "; ".join(info["relaxed"]))
    if probe.get("fixes"):
        out.append("installed after ImportErrors: " + ", ".join(probe["fixes"]))
    out.append("-- vLLM base imports")
    for m, r in probe["base"].items():
        out.append(f"  {'ok  ' if r['ok'] else 'FAIL'} {m}" + ("" if r["ok"] else f": {r['error']}"))
    out.append("-- (a) runtime imports")
    for m, r in probe["imports"].items():
        out.append(f"  {'ok  ' if r['ok'] else 'FAIL'} {m}" + ("" if r["ok"] else f": {r['error']}"))
        if not r["ok"]:
            out += _indent(r["tail"])
    out.append("-- run-time lookups (what the runtime resolved in this vLLM)")
    for k, v in probe["lookups"].items():
        out.append(f"  {k}: {v}")
    out.append("-- (b) register(), then each site's target modules imported")
    reg = probe["register"]
    out.append(f"  register(): {'ok' if reg['ok'] else reg['error']}")
    for m, r in probe["targets"].items():
        out.append(
            f"  import {m}: "
            + ("ok" if r["ok"] else r["error"])
            + (f" (imported again: {r['retry']})" if r.get("retry") else "")
        )
        if not r["ok"] and "No module named" not in r["error"]:
            out += _indent(r["tail"])
            if "_OpNamespace" in r["error"]:
                out.append(
                    "      (no-GPU artefact: vLLM reads torch.ops._C.* at import time; those ops are "
                    "registered by vllm._C_stable_libtorch, which needs libcuda.so.1)"
                )
    for k, v in probe["hooks"].items():
        out.append(f"  {k}: {v if not isinstance(v, dict) else (v.get('value') if v.get('ok') else v.get('error'))}")
    for op, schema in probe["ops"].items():
        out.append(f"  torch.ops.vllm_overlap.{op}: {schema}")

    def live(o):
        return o["describe"] + (f" ({o['note']})" if o.get("note") else "")

    line = probe.get("summary_line", {})
    summary = f"summary: {line['value']}" if line.get("ok") else ""
    if markdown:
        md = [
            "```text",
            *out,
            "```",
            "",
            "| feature | target | outcome here | static (wheel source) |",
            "|---|---|---|---|",
        ]
        md += [
            f"| {o['feature']} | `{o['target']}` | {live(o).replace('|', '/')} | {o['static'].replace('|', '/')} |"
            for o in probe["outcomes"]
        ]
        if summary:
            md += ["", f"`{summary}`"]
        return "\n".join(md)
    out.append("-- outcomes   [static: the anchors matched against the wheel's source]")
    for o in probe["outcomes"]:
        out.append(f"  {o['feature']:<17} {o['target']}\n      {live(o)}   [static: {o['static']}]")
    if summary:
        out.append("  " + summary)
    return "\n".join(out)


def plugin_revision(plugin_root: str) -> str:
    try:
        head = subprocess.run(
            ["git", "-C", plugin_root, "log", "-1", "--format=%h %s"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", plugin_root, "status", "--porcelain", "--", "vllm_overlap"], capture_output=True, text=True
        ).stdout.strip()
        return f"{plugin_root} at {head[:100]}" + (" (vllm_overlap/ has uncommitted changes)" if dirty else "")
    except Exception:
        return plugin_root


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("releases", nargs="*", help="vLLM releases, e.g. 0.26.0 0.33.0")
    ap.add_argument("--wheel-dir", default=default_wheel_dir(), help="cached vLLM wheels (default %(default)s)")
    ap.add_argument("--venv-root", default=default_venv_root(), help="where venv-<release> go (default %(default)s)")
    ap.add_argument(
        "--plugin-root", default=default_plugin_root(), help="the checkout holding vllm_overlap (default %(default)s)"
    )
    ap.add_argument("--rebuild", action="store_true", help="remake the venvs even if complete")
    ap.add_argument("--names-only", action="store_true", help="only the name table (no venv)")
    ap.add_argument("--names-releases", nargs="*", help="releases of the name table (default: every cached wheel)")
    ap.add_argument("--max-fixes", type=int, default=5)
    ap.add_argument("--markdown", metavar="FILE", help="also write a markdown report")
    ap.add_argument("--json", metavar="FILE", help="also write the raw results")
    args = ap.parse_args(argv)
    if args.plugin_root is None:
        ap.error("no vllm_overlap package here or beside this script: pass --plugin-root")

    results = {}
    ok = True
    print(f"plugin: {plugin_revision(args.plugin_root)}")
    for release in args.releases if not args.names_only else []:
        try:
            wheel = find_wheel(release, args.wheel_dir)
            info = build_venv(release, wheel, args.venv_root, args.rebuild)
            probe = run_probe(info["venv"], args.plugin_root, info["log"], wheel, args.max_fixes)
        except Exception as exc:
            info, probe = {"release": release}, {"crashed": True, "stderr_tail": f"{type(exc).__name__}: {exc}"}
        results[release] = {"install": info, "probe": probe}
        ok &= release_ok(probe)
        print(f"==== vLLM {release} " + "=" * 60)
        print(report_text(info, probe))
        print()
    name_releases = args.names_releases or cached_releases(args.wheel_dir)
    for r in args.releases:
        if r not in name_releases and cached_wheels(r, args.wheel_dir):
            name_releases.append(r)
    name_releases = sorted(set(name_releases), key=release_key)
    releases, rows = name_table(name_releases, args.wheel_dir)
    print("==== (c) vLLM names the plugin uses x release (+ present, - absent, -mod no such module)")
    print(name_table_text(releases, rows))
    _, class_rows = class_name_table(releases, args.wheel_dir, args.plugin_root)
    if class_rows:
        print("==== (c2) vLLM classes the runtime matches by name (defined anywhere in the wheel)")
        print(name_table_text(releases, class_rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {
                    "plugin": plugin_revision(args.plugin_root),
                    "releases": results,
                    "names": {"releases": releases, "rows": rows, "classes": class_rows},
                },
                fh,
                indent=1,
                default=str,
            )
    if args.markdown:
        md = [
            f"# vllm-overlap release check ({time.strftime('%Y-%m-%d')})",
            "",
            f"Plugin: {plugin_revision(args.plugin_root)}",
            "",
        ]
        for release, res in results.items():
            md += [f"## vLLM {release}", "", report_text(res["install"], res["probe"], markdown=True), ""]
        md += [
            "## (c) vLLM names the plugin uses x release",
            "",
            "`+` present, `-` absent, `-mod` no such module, `-cls` no such class, `+lazy` via a module `__getattr__`, "
            "`-arg x` the callable lacks parameter x.",
            "",
            name_table_text(releases, rows, markdown=True),
            "",
        ]
        if class_rows:
            md += [
                "### (c2) vLLM classes the runtime matches by name (stream_safety; defined anywhere in the wheel)",
                "",
                name_table_text(releases, class_rows, markdown=True),
                "",
            ]
        with open(args.markdown, "w") as fh:
            fh.write("\n".join(md))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
