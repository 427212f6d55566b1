"""DeepSeek overlap regions on a real GPU (marked ``cuda``: skipped without one).

* on/off: the real layers (Indexer, MLA wrapper with a real Indexer, DeepseekV32Attention),
  built like the CPU tests build them and moved to the GPU, through the upstream and the
  rewritten forward with the same stand-ins: bit-identical (tolerance zero), and the
  rewritten one really forked onto vLLM's aux stream;
* CUDA graphs: each overlapped region (``q_and_k``, ``a_proj``, ``q_b_proj_beside_index_q``)
  captured with the aux stream active on static inputs, replayed on new data copied in, equal
  to the upstream statements run eagerly on that data.

Imports nothing CUDA-specific at module level, so it collects (and skips) on the CPU.
"""

from __future__ import annotations

import types
from collections import Counter

import pytest
import torch
from conftest import functions, site_entry, site_runtime
from deepseek_layers import (
    INDEXER_TARGET,
    V32_TARGET,
    WRAPPER_TARGET,
    DeepseekStandins,
    build_indexer,
    build_indexer_rope,
    build_mla_wrapper,
    build_v32_attention,
    deepseek_v32_config,
    identical,
    make_inputs,
    run_indexer,
    run_mla_wrapper,
    run_v32,
)

from vllm_overlap.runtime import streams

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("forks_in_eager_steps")]



@pytest.fixture
def forks(monkeypatch, deepseek_overlay):
    """Every real fork (vLLM's fork/join helper with an aux stream): the stream fn1 ran on."""
    assert streams.get_aux_stream() is not None, "vLLM made no aux stream on this GPU"
    seen = []
    real = streams._parallel_impl()

    def counting(fn0, fn1, event0, event1, aux):
        def fn1_logged():
            seen.append(torch.cuda.current_stream())
            return fn1()

        return real(fn0, fn1_logged, event0, event1, aux)

    monkeypatch.setattr(streams, "_parallel_impl", lambda: counting)
    return seen


@pytest.fixture
def cuda_standins(monkeypatch, deepseek_overlay):
    """The CPU tests' stand-ins, their fixed projections made on the GPU."""
    import deepseek_standins

    real = deepseek_standins._projection
    monkeypatch.setattr(
        deepseek_standins, "_projection", lambda inputs, width: real(inputs, width).cuda()
    )
    standins = DeepseekStandins()
    standins.install(monkeypatch)
    return standins




def _to_cuda(module: torch.nn.Module, moved: dict | None = None) -> torch.nn.Module:
    """Parameters, buffers and plain tensor attributes (top-k buffers, W_UK_T, ...) of every
    submodule onto the GPU; a tensor shared by several modules stays shared."""
    moved = {} if moved is None else moved
    module.cuda()
    for sub in module.modules():
        for name, value in list(vars(sub).items()):
            if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
                key = id(value)
                if key not in moved:
                    moved[key] = value.cuda()
                setattr(sub, name, moved[key])
    return module


def _inputs(hf, tokens):
    positions, hidden, qr = make_inputs(hf, tokens)
    return positions.cuda(), hidden.cuda(), qr.cuda()


def _on_off(standins, forks, run_upstream, run_rewritten, expected_forks):
    standins.calls.clear()
    expected = run_upstream()
    upstream_calls = Counter(standins.calls)
    assert forks == []
    standins.calls.clear()
    actual = run_rewritten()
    torch.cuda.synchronize()
    assert Counter(standins.calls) == upstream_calls
    assert len(forks) == expected_forks
    aux = streams.get_aux_stream()
    assert all(stream == aux for stream in forks)  # fn1 ran on vLLM's aux stream
    assert identical(expected, actual)


# --------------------------------------------------------------------------------------------
# Real layers, on and off
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_indexer_on_off_identical(deepseek_vllm, cuda_standins, forks, tokens):
    hf = deepseek_v32_config()
    upstream, rewritten = functions(INDEXER_TARGET)
    indexer = build_indexer(deepseek_vllm, hf, standins=cuda_standins, seed=1)
    _to_cuda(indexer)
    cuda_standins.attach_indexer(indexer)  # its stand-in writes the (moved) top-k buffer
    rope = _to_cuda(build_indexer_rope(hf))
    positions, hidden, qr = _inputs(hf, tokens)
    _on_off(
        cuda_standins,
        forks,
        lambda: run_indexer(upstream, indexer, hidden, qr, positions, rope),
        lambda: run_indexer(rewritten, indexer, hidden, qr, positions, rope),
        expected_forks=1,
    )


@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_mla_wrapper_with_indexer_on_off_identical(
    deepseek_vllm, cuda_standins, forks, monkeypatch, tokens
):
    hf = deepseek_v32_config()
    upstream, rewritten = functions(WRAPPER_TARGET)
    indexer_upstream, _ = functions(INDEXER_TARGET)
    wrapper = build_mla_wrapper(deepseek_vllm, hf, True, standins=cuda_standins)
    _to_cuda(wrapper)
    cuda_standins.attach_indexer(wrapper.indexer)
    cuda_standins.attach_mla_attn(wrapper.mla_attn, wrapper.topk_indices_buffer)
    positions, hidden, _ = _inputs(hf, tokens)

    def run_upstream():
        with monkeypatch.context() as m:
            indexer = wrapper.indexer
            m.setattr(indexer, "forward", types.MethodType(indexer_upstream, indexer))
            return run_mla_wrapper(upstream, wrapper, positions, hidden)

    _on_off(
        cuda_standins,
        forks,
        run_upstream,
        lambda: run_mla_wrapper(rewritten, wrapper, positions, hidden),
        expected_forks=2,  # mla_q_b_proj, and the indexer's own inside its branch 0
    )


@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_v32_attention_on_off_identical(deepseek_vllm, cuda_standins, forks, tokens):
    upstream, rewritten = functions(V32_TARGET)
    layer = build_v32_attention(deepseek_vllm, deepseek_v32_config(), standins=cuda_standins)
    _to_cuda(layer)
    positions, hidden, _ = _inputs(deepseek_v32_config(), tokens)
    _on_off(
        cuda_standins,
        forks,
        lambda: run_v32(upstream, layer, positions, hidden),
        lambda: run_v32(rewritten, layer, positions, hidden),
        expected_forks=2,  # deepseek_indexer's a_proj, mla_q_b_proj's q paths
    )


# --------------------------------------------------------------------------------------------
# Each region captured in a CUDA graph
# --------------------------------------------------------------------------------------------


class _Linear(torch.nn.Module):
    """A vLLM-style linear: returns (output, bias)."""

    def __init__(self, inputs, outputs, seed):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        weight = torch.randn(outputs, inputs, generator=gen) / inputs**0.5
        self.weight = torch.nn.Parameter(weight.to("cuda", torch.bfloat16), requires_grad=False)

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight), None


HIDDEN, Q_LORA, KV_LORA, ROPE, NOPE, HEADS = 2048, 1536, 512, 64, 128, 16
IDX_HEADS, IDX_DIM = 64, 128


def _v32_like():
    """Just the attributes the V3.2 regions read, at DeepSeek-V3.2-like widths."""
    indexer = types.SimpleNamespace(
        wk_weights_proj=_Linear(HIDDEN, IDX_DIM + IDX_HEADS, 1),
        wq_b=_Linear(Q_LORA, IDX_HEADS * IDX_DIM, 2),
        n_head=IDX_HEADS,
        head_dim=IDX_DIM,
    )
    gen = torch.Generator().manual_seed(3)
    return types.SimpleNamespace(
        indexer=indexer,
        skip_topk=False,
        fused_qkv_a_proj=_Linear(HIDDEN, Q_LORA + KV_LORA + ROPE, 4),
        q_b_proj=_Linear(Q_LORA, HEADS * (NOPE + ROPE), 5),
        num_local_heads=HEADS,
        qk_head_dim=NOPE + ROPE,
        qk_nope_head_dim=NOPE,
        qk_rope_head_dim=ROPE,
        W_UK_T=(torch.randn(HEADS, NOPE, KV_LORA, generator=gen) / NOPE**0.5).to(
            "cuda", torch.bfloat16
        ),
    )


def _legacy_indexer_like():
    k_norm = torch.nn.LayerNorm(IDX_DIM, eps=1e-6).cuda()
    return types.SimpleNamespace(
        wq_b=_Linear(Q_LORA, IDX_HEADS * IDX_DIM, 6),
        wk_weights_proj=_Linear(HIDDEN, IDX_DIM + IDX_HEADS, 7),
        k_norm=lambda x: k_norm(x.float()).to(x.dtype),
        head_dim=IDX_DIM,
        prefix="cuda.layers.0.self_attn.indexer",
    )


def _captured(region, static_inputs):
    """Warm up, capture ``region(*static_inputs)`` in a CUDA graph; the graph and outputs."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        region(*static_inputs)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = region(*static_inputs)
    return graph, outputs


def _flat(result):
    if isinstance(result, torch.Tensor):
        return (result,)
    return tuple(t for item in result for t in _flat(item))


def _replay_equals_eager(site_id, layer, shapes, forks, *extra):
    """Capture the site's entry on ``layer`` in a CUDA graph; each replay on fresh inputs gives
    exactly what upstream's statements (the serial path compiled from the anchor) give eagerly."""
    entry, rt = site_entry(site_id), site_runtime(site_id)
    gen = torch.Generator(device="cuda").manual_seed(11)
    static = [torch.randn(s, device="cuda", dtype=torch.bfloat16, generator=gen) for s in shapes]
    graph, outputs = _captured(lambda *inputs: entry(layer, *inputs, *extra), static)
    assert len(forks) == 2  # warm-up and capture both forked onto the aux stream
    aux = streams.get_aux_stream()
    assert all(stream == aux for stream in forks)
    for _ in range(2):
        fresh = [torch.randn_like(t) for t in static]
        for s, f in zip(static, fresh):
            s.copy_(f)
        graph.replay()
        torch.cuda.synchronize()
        expected = rt.site.result(*rt.serial(layer, *fresh, *extra))
        assert identical(_flat(outputs), _flat(expected))


@pytest.mark.parametrize("tokens", [1, 16, 256])
def test_q_and_k_replays_in_a_cuda_graph(deepseek_overlay, forks, tokens):
    shapes = [(tokens, HIDDEN), (tokens, Q_LORA)]
    _replay_equals_eager("deepseek_indexer_legacy", _legacy_indexer_like(), shapes, forks)


@pytest.mark.parametrize("tokens", [1, 16, 256])
def test_a_proj_replays_in_a_cuda_graph(deepseek_overlay, forks, tokens):
    _replay_equals_eager("deepseek_indexer_v32", _v32_like(), [(tokens, HIDDEN)], forks)


@pytest.mark.parametrize("prepare_mqa_query", [True, False])
@pytest.mark.parametrize("tokens", [1, 16, 256])
def test_q_b_proj_beside_index_q_replays_in_a_cuda_graph(
    deepseek_overlay, forks, tokens, prepare_mqa_query
):
    shapes = [(tokens, Q_LORA)]
    _replay_equals_eager("mla_q_b_proj_v32", _v32_like(), shapes, forks, prepare_mqa_query)
