"""Every site whose layer builds outside the engine, on a real GPU (marked ``cuda``: skipped
without one): the real layer (real kernels, no stand-ins) built on the GPU by the layer
benchmark's builder, its entry forked onto vLLM's aux stream, bit-identical to the site's
serial path (upstream's statements, from the anchor), eagerly and replayed from a CUDA graph
captured with the aux stream. The DeepSeek V3.2 sites need the engine's MLA backend and are
covered by ``test_deepseek_cuda``.

Imports nothing CUDA-specific at module level, so it collects (and skips) on the CPU.
"""

from __future__ import annotations

import pytest
import torch
from conftest import same_tensors, site_entry, site_runtime, tensors_of

from vllm_overlap.runtime import streams

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("forks_in_eager_steps")]

# site -> (fixture giving a VllmConfig, the tiny HF config of its layer)
GPU_SITES = {
    "gdn_in_proj": ("vllm_context", "qwen3_next"),
    "deepseek_indexer_legacy": ("deepseek_vllm", "deepseek_v32"),
    "kv_a_proj_minicpm3": ("minicpm3_vllm", "minicpm3"),
    "delta_in_proj_olmo_hybrid": ("vllm_context", "olmo_hybrid"),
    "delta_in_proj_bailing_moe_v3": ("vllm_context", "bailing_moe_v3"),  # a fan-out of three
    "delta_in_proj_kimi_gdn": ("vllm_context", "kimi_linear"),
}


def _hf_config(name):
    from vllm_overlap.testing import tiny_models

    if name == "qwen3_next":
        return tiny_models.qwen3_next_config(2)
    if name == "deepseek_v32":
        from deepseek_layers import deepseek_v32_config

        return deepseek_v32_config()
    return getattr(tiny_models, f"{name}_config")()


def _args(request, site_id, tokens):
    import importlib.util

    from vllm_overlap.sites import SITES
    from vllm_overlap.testing.layer_builders import SITE_LAYERS

    module = SITES[site_id].targets[0].module
    if importlib.util.find_spec(module) is None:  # e.g. BailingMoeV3 before vLLM 0.28
        pytest.skip(f"this vLLM has no {module}")
    fixture, config = GPU_SITES[site_id]
    request.getfixturevalue("overlay_applied")
    vllm_config, hf = request.getfixturevalue(fixture), _hf_config(config)
    spec = SITE_LAYERS[site_id]
    layer = spec.build(vllm_config, hf, torch.bfloat16, "cuda", 0)
    return spec.inputs(layer, hf, tokens, torch.bfloat16, "cuda", torch.Generator().manual_seed(tokens))


def test_every_gpu_site_is_a_declared_site_with_a_builder():
    from vllm_overlap.sites import SITES
    from vllm_overlap.testing.layer_builders import SITE_LAYERS

    assert set(GPU_SITES) <= set(SITES) and set(GPU_SITES) <= set(SITE_LAYERS)


@pytest.mark.parametrize("tokens", [1, 8, 64])
@pytest.mark.parametrize("site_id", sorted(GPU_SITES))
def test_the_entry_forks_and_equals_the_serial_path(request, monkeypatch, site_id, tokens):
    assert streams.get_aux_stream() is not None, "vLLM made no aux stream on this GPU"
    forks = []
    real = streams._many_impl()  # every fork goes through it: the pair's (aux first) and the fan-out's
    monkeypatch.setattr(
        streams, "_many_impl", lambda: lambda *a, **k: forks.append(torch.cuda.current_stream()) or real(*a, **k)
    )
    args = _args(request, site_id, tokens)
    rt = site_runtime(site_id)
    with torch.no_grad():
        expected = rt.site.result(*rt.serial(*args))
        actual = site_entry(site_id)(*args)
    torch.cuda.synchronize()
    assert len(forks) == 1
    assert tensors_of(expected) and same_tensors(actual, expected)


@pytest.mark.parametrize("site_id", sorted(GPU_SITES))
def test_the_entry_replays_from_a_cuda_graph(request, site_id):
    """Captured with the aux stream on static inputs; replayed on new data copied in: equal to
    the serial path run eagerly on that data."""
    args = _args(request, site_id, 8)
    rt = site_runtime(site_id)
    entry = site_entry(site_id)
    static = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    with torch.no_grad():
        entry(*static)  # warm up outside capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = entry(*static)
        fresh = _args(request, site_id, 8)
        for s, f in zip(static, fresh):
            if isinstance(s, torch.Tensor):
                s.copy_(f)
        graph.replay()
        torch.cuda.synchronize()
        expected = rt.site.result(*rt.serial(*static))
    assert tensors_of(expected) and same_tensors(out, expected)


def test_a_user_site_checks_its_first_run_then_forks_on_the_gpu(request, monkeypatch, minicpm3_vllm):
    """The documented user site (docs/user-sites.md) (MiniCPM3's q path beside kv_a_proj_with_mqa) on the real layer
    on the GPU: the first call is the hazard check (serial, nothing found), the next forks onto
    the aux stream; both equal the serial statements."""
    import importlib

    from conftest import minicpm3_user_site_yaml

    from vllm_overlap.config import active as active_config
    from vllm_overlap.config.loader import LoadedConfig, parse_config
    from vllm_overlap.engine import user_sites
    from vllm_overlap.runtime import module_namespaces as installed
    from vllm_overlap.testing.layer_builders import build_minicpm3_attention
    from vllm_overlap.testing.tiny_models import minicpm3_config

    request.getfixturevalue("overlay_applied")
    config = parse_config(minicpm3_user_site_yaml("gpu_probe"), "user.yaml")
    (cfg,) = config.sites
    importlib.import_module(cfg.module)
    proof = user_sites.prove(cfg, user_sites.read_module(cfg.module))
    assert proof.site is not None, proof.refused
    before = active_config.loaded()
    active_config.set_loaded(LoadedConfig(config, "user.yaml"))
    try:
        rt = installed.standalone(proof.site, proof.site.targets[0])
        layer = build_minicpm3_attention(minicpm3_vllm, minicpm3_config(), device="cuda", seed=2)
        hidden = torch.randn(8, 128, device="cuda", dtype=torch.bfloat16)
        forks = []
        real = streams._parallel_impl()
        monkeypatch.setattr(streams, "_parallel_impl", lambda: lambda *a: forks.append(1) or real(*a))
        with torch.no_grad():
            expected = rt.serial(layer, hidden)
            first = rt(layer, hidden)
            assert forks == [] and rt.off_reason == ""
            second = rt(layer, hidden)
        torch.cuda.synchronize()
        assert forks == [1]
        assert same_tensors(first, expected) and same_tensors(second, expected)
    finally:
        active_config.set_loaded(before)
