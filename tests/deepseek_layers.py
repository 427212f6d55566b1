"""Real DeepSeek-V3 / V3.2 attention layers, tiny and seeded, running upstream's forward on the CPU.

Builds three real vLLM layers with seeded random weights (post-processed like vLLM's loader):

* ``Indexer`` - the legacy DeepSeek-V3.2 lightning indexer (``models/deepseek_v2.py``);
* ``MultiHeadLatentAttentionWrapper`` - with a real ``Indexer`` (V3.2) or without one (V3);
* ``DeepseekV32Attention`` - the V3.2 path of ``vllm/models/deepseek_v32/attention.py``,
  with an indexer, without one (an IndexCache "shared" layer), or with ``skip_topk`` set.

What cannot run on this CPU (Triton kernels, sparse attention, the indexer's top-k op) is
replaced by ``deepseek_standins.DeepseekStandins``: deterministic plain-torch stand-ins whose
outputs depend on all their tensor inputs and which count their calls. Two runs of one forward on the same layer
and inputs are bit-identical, so an upstream forward and a rewritten one can be compared
exactly. Each ``run_*`` helper takes the forward as an unbound function (``type(layer).forward``
or a rewrite of it) and returns a tuple of output tensors (cloned) to compare with
``identical``; where the layer has a top-k indices buffer the tuple ends with its rows, which
the stand-ins use as the channel between the indexer's work and the attention.

Use from pytest (``monkeypatch`` undoes the module patches)::

    with standalone_vllm(build_checkpoint(tmp_dir)) as vllm_config:
        standins = DeepseekStandins()
        standins.install(monkeypatch)
        layer = build_v32_attention(vllm_config, deepseek_v32_config(), standins=standins)
        positions, hidden_states, _ = make_inputs(layer_config(layer), 7)
        ref = run_v32(DeepseekV32Attention.forward, layer, positions, hidden_states)
        assert identical(ref, run_v32(rewritten_forward, layer, positions, hidden_states))

``tests/test_deepseek_standins.py`` runs every layer variant through its stand-ins.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch
from deepseek_standins import DEEPSEEK_V2, INDEXER_BRANCHES, V32_ATTENTION, DeepseekStandins  # noqa: F401 (re-exported)
from torch import nn

from vllm_overlap.engine.rewrite import Target

V32_ROCM = "vllm.models.deepseek_v32.amd.rocm"
MLA = "vllm.model_executor.layers.mla"
# The functions the DeepSeek features rewrite.
V32_TARGET = Target(V32_ATTENTION, "DeepseekV32Attention.forward")
ROCM_TARGET = Target(V32_ROCM, "DeepseekV32MLAAttention.forward")
INDEXER_TARGET = Target(DEEPSEEK_V2, "Indexer.forward")
WRAPPER_TARGET = Target(MLA, "MultiHeadLatentAttentionWrapper.forward")
INDEXER_ATTRS = {"index_topk": 16, "index_n_heads": 4, "index_head_dim": 128}

_built: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layer -> (vllm_config, hf_config)


# --------------------------------------------------------------------------------------------
# Configs and checkpoint
# --------------------------------------------------------------------------------------------


def deepseek_v3_config():
    """The tiny DeepSeek-V3 HF config (``vllm_overlap.testing.tiny_models.deepseek_v3_config``)."""
    from vllm_overlap.testing.tiny_models import deepseek_v3_config as v3

    return v3()


def deepseek_v32_config():
    """The tiny DeepSeek-V3 config plus the lightning-indexer attributes: vLLM treats a config
    with ``index_topk`` as V3.2. index_head_dim is the fp8 quant block (128)."""
    config = deepseek_v3_config()
    for name, value in INDEXER_ATTRS.items():
        setattr(config, name, value)
    return config


def build_checkpoint(out: str) -> str:
    """A tiny DeepSeek-V3 checkpoint in ``out``, for ``standalone_vllm(out)`` (a VllmConfig
    with ``use_mla``, whose CPU MLA backend needs kv_lora_rank 512 + qk_rope_head_dim 64)."""
    from vllm_overlap.testing.tiny_models import build

    return build("deepseek-v3", out)


def layer_config(layer: nn.Module):
    """The HF config ``layer`` was built from."""
    return _built[layer][1]


def make_inputs(hf_config, tokens: int, seed: int = 0, dtype: torch.dtype = torch.bfloat16):
    """Seeded ``(positions, hidden_states, qr)`` for ``tokens`` tokens; ``qr`` (the normed
    q_lora latent) is the Indexer's second input."""
    gen = torch.Generator().manual_seed(seed)
    positions = torch.randint(0, hf_config.max_position_embeddings, (tokens,), generator=gen)
    hidden_states = torch.randn(tokens, hf_config.hidden_size, generator=gen).to(dtype)
    qr = torch.randn(tokens, hf_config.q_lora_rank, generator=gen).to(dtype)
    return positions, hidden_states, qr


def identical(a: tuple, b: tuple) -> bool:
    """Whether two ``run_*`` results are bit-identical (shapes, dtypes and bytes)."""
    return len(a) == len(b) and all(
        x.shape == y.shape
        and x.dtype == y.dtype
        and torch.equal(x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8))
        for x, y in zip(a, b)
    )


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------


def _register(layer: nn.Module, vllm_config, hf_config) -> None:
    _built[layer] = (vllm_config, hf_config)


def build_indexer_rope(hf_config, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    from vllm_overlap.testing.layer_builders import build_indexer_rope as build

    return build(hf_config, dtype)


def build_indexer(vllm_config, hf_config, *, standins: DeepseekStandins, **kwargs):
    """``site_layers.build_indexer`` with its ``indexer_op`` stood in. Its forward takes the
    ``default`` branch on the CPU; see ``DeepseekStandins.select_indexer_branch`` for the
    others."""
    from vllm_overlap.testing import layer_builders as site_layers

    indexer = site_layers.build_indexer(vllm_config, hf_config, **kwargs)
    _register(indexer, vllm_config, hf_config)
    standins.attach_indexer(indexer)
    return indexer


def build_mla_wrapper(vllm_config, hf_config, with_indexer: bool, *, standins: DeepseekStandins, **kwargs):
    """``site_layers.build_mla_wrapper`` with its MLA attention (and indexer) stood in."""
    from vllm_overlap.testing import layer_builders as site_layers

    wrapper = site_layers.build_mla_wrapper(vllm_config, hf_config, with_indexer, **kwargs)
    _register(wrapper, vllm_config, hf_config)
    if with_indexer:
        _register(wrapper.indexer, vllm_config, hf_config)
        standins.attach_indexer(wrapper.indexer)
    standins.attach_mla_attn(wrapper.mla_attn, wrapper.topk_indices_buffer if with_indexer else None)
    return wrapper


def build_v32_attention(vllm_config, hf_config, with_indexer: bool = True, *, standins: DeepseekStandins, **kwargs):
    """``site_layers.build_v32_attention`` on the CPU MLA backend (passed as ``attn_backend``:
    the CPU platform refuses sparse MLA), its sparse indexer + attention stood in and its impl
    wrapped with counted batch hooks. Without an indexer it is an IndexCache shared layer;
    for the runtime toggle set ``layer.skip_topk = True`` on a layer with one."""
    from vllm_overlap.testing import layer_builders as site_layers

    layer = site_layers.build_v32_attention(
        vllm_config, hf_config, with_indexer, attn_backend=site_layers.cpu_mla_backend("cpu"), **kwargs
    )
    _register(layer, vllm_config, hf_config)
    standins.attach_v32(layer)
    return layer


# --------------------------------------------------------------------------------------------
# Runners
# --------------------------------------------------------------------------------------------


@contextmanager
def _forward_context(layer: nn.Module):
    """The context a forward runs in without attention metadata: no KV cache, an empty
    slot-mapping dict, the layers registered in the build's VllmConfig."""
    from vllm.config import set_current_vllm_config
    from vllm.forward_context import set_forward_context

    vllm_config = _built[layer][0]
    with torch.no_grad(), set_current_vllm_config(vllm_config):
        with set_forward_context(None, vllm_config):
            yield


def _with_topk(output: torch.Tensor, buffer: torch.Tensor | None, tokens: int) -> tuple:
    if buffer is None:
        return (output.clone(),)
    return output.clone(), buffer[:tokens].clone()


def run_indexer(forward_fn, indexer, hidden_states, qr, positions, rotary_emb) -> tuple:
    """``forward_fn(indexer, hidden_states, qr, positions, rotary_emb)`` on a reset top-k
    buffer; returns ``(topk rows,)`` (what the indexer op wrote)."""
    buffer = indexer.topk_indices_buffer
    buffer.fill_(-1)
    with _forward_context(indexer):
        forward_fn(indexer, hidden_states, qr, positions, rotary_emb)
    return (buffer[: hidden_states.shape[0]].clone(),)


def run_mla_wrapper(forward_fn, wrapper, positions, hidden_states) -> tuple:
    """``forward_fn(wrapper, positions, hidden_states)`` on a reset top-k buffer; returns
    ``(output,)``, plus the top-k rows when the wrapper is sparse."""
    buffer = wrapper.topk_indices_buffer if wrapper.is_sparse else None
    if buffer is not None:
        buffer.fill_(-1)
    with _forward_context(wrapper):
        output = forward_fn(wrapper, positions, hidden_states)
    return _with_topk(output, buffer, hidden_states.shape[0])


def run_v32(forward_fn, layer, positions, hidden_states) -> tuple:
    """``forward_fn(layer, positions, hidden_states)`` in a forward context without attention
    metadata, on a reset top-k buffer; returns ``(output, topk rows)``."""
    layer.topk_indices_buffer.fill_(-1)
    with _forward_context(layer):
        output = forward_fn(layer, positions, hidden_states)
    return _with_topk(output, layer.topk_indices_buffer, hidden_states.shape[0])
