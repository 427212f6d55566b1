"""Runtime of deepseek_indexer: the indexer's k/w projection beside the layer's q path.

Two code shapes call in here.

**V3.2 CUDA path** (``DeepseekV32Attention.forward`` and its ROCm subclass): :func:`a_proj`
replaces ``qkv_lora = self.fused_qkv_a_proj(hidden_states)[0]`` and the later
``kw = self.indexer.wk_weights_proj(hidden_states)[0]``. This forward runs without Dynamo
(the model class has no ``@support_torch_compile``; vLLM captures it with breakable CUDA
graphs), so it is a plain call of the stream primitive, which runs serially during
breakable capture (vLLM's own ``maybe_execute_in_parallel`` check) and never holds a fork
across an eager break: fork and join both happen inside this call. Should Dynamo ever trace
it, the call runs the upstream statements serially.

**Legacy path** (``Indexer.forward`` in deepseek_v2.py, traced by torch.compile):
:func:`q_and_k` replaces ``q, _ = self.wq_b(qr)`` and, in each of the three branches, the
``wk_weights_proj`` GEMM, its split and ``k_norm``. Under Dynamo it is the custom op
``torch.ops.vllm_overlap.deepseek_indexer(hidden_states, qr, q_width, kw_width, k_width,
layer)`` returning contiguous ``q [T, q_width]`` (qr's dtype), ``kw [T, kw_width]`` and
``k [T, k_width]`` (hidden_states' dtype: vLLM's LayerNorm casts back to its input dtype);
the rewritten code slices ``weights`` out of ``kw`` exactly as upstream does. Widths are
the projections' per-rank output sizes set at layer init, never read from (possibly
repacked) weights. Eager calls run the op's body without the dispatcher round trip.
"""

from __future__ import annotations

import torch

from .. import state, streams
from . import (
    LayerNameType,
    any_lora,
    check_output,
    encode_layer_name,
    overlap_possible,
    register_op,
    resolve_layer,
)

OP_NAME = "deepseek_indexer"


def out_width(proj: torch.nn.Module) -> int:
    """Per-rank output width of a vLLM linear layer (ReplicatedLinear has no partition)."""
    width = getattr(proj, "output_size_per_partition", None)
    return proj.output_size if width is None else width


def _feature():
    return state.feature_config(OP_NAME)


# --------------------------------------------------------------------------- V3.2 CUDA path


def has_active_indexer(layer: torch.nn.Module) -> bool:
    """The condition upstream's V3.2 forward uses for running the indexer in this layer."""
    return layer.indexer is not None and not layer.skip_topk


def a_proj(layer: torch.nn.Module, hidden_states: torch.Tensor):
    """(fused_qkv_a_proj(h)[0], indexer.wk_weights_proj(h)[0] or None): the A-projection on
    the current stream beside the indexer's k/w GEMM on the aux stream."""
    if not has_active_indexer(layer):
        return layer.fused_qkv_a_proj(hidden_states)[0], None
    if (
        not overlap_possible()
        or torch.compiler.is_compiling()
        or any_lora(layer.fused_qkv_a_proj, layer.indexer.wk_weights_proj)
    ):
        return (
            layer.fused_qkv_a_proj(hidden_states)[0],
            layer.indexer.wk_weights_proj(hidden_states)[0],
        )
    return streams.run_pair(
        OP_NAME,
        lambda: layer.fused_qkv_a_proj(hidden_states)[0],
        lambda: layer.indexer.wk_weights_proj(hidden_states)[0],
        hidden_states.shape[0],
        _feature(),
    )


# --------------------------------------------------------------------------- legacy path


def q_and_k(indexer: torch.nn.Module, hidden_states: torch.Tensor, qr: torch.Tensor):
    """(wq_b(qr), wk_weights_proj(h), k_norm(k)): q on the current stream beside the k/w
    GEMM and k_norm on the aux stream."""
    if not overlap_possible() or any_lora(indexer.wq_b, indexer.wk_weights_proj):
        return upstream(indexer, hidden_states, qr)
    if torch.compiler.is_compiling():  # Dynamo must see one opaque op, not streams
        return torch.ops.vllm_overlap.deepseek_indexer(
            hidden_states,
            qr,
            out_width(indexer.wq_b),
            out_width(indexer.wk_weights_proj),
            indexer.head_dim,
            encode_layer_name(indexer.prefix),
        )
    return _overlapped(indexer, hidden_states, qr)


def _k_path(indexer, hidden_states):
    kw, _ = indexer.wk_weights_proj(hidden_states)
    k = kw[:, : indexer.head_dim]
    k = indexer.k_norm(k)
    return kw, k


def upstream(indexer, hidden_states, qr):
    """The statements the rewrite replaced, in upstream's order."""
    q, _ = indexer.wq_b(qr)
    kw, k = _k_path(indexer, hidden_states)
    return q, kw, k


def _overlapped(indexer, hidden_states, qr):
    q, (kw, k) = streams.run_pair(
        OP_NAME,
        lambda: indexer.wq_b(qr)[0],
        lambda: _k_path(indexer, hidden_states),
        hidden_states.shape[0],
        _feature(),
    )
    return q, kw, k


def deepseek_indexer(
    hidden_states: torch.Tensor,
    qr: torch.Tensor,
    q_width: int,
    kw_width: int,
    k_width: int,
    layer_name: LayerNameType,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    indexer = resolve_layer(layer_name)
    q, kw, k = _overlapped(indexer, hidden_states, qr)
    return (
        check_output(q, qr, q_width, "indexer.wq_b"),
        check_output(kw, hidden_states, kw_width, "indexer.wk_weights_proj"),
        check_output(k, hidden_states, k_width, "indexer.k_norm"),
    )


def deepseek_indexer_fake(
    hidden_states: torch.Tensor,
    qr: torch.Tensor,
    q_width: int,
    kw_width: int,
    k_width: int,
    layer_name: LayerNameType,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    tokens = hidden_states.shape[0]
    return (
        qr.new_empty((tokens, q_width)),
        hidden_states.new_empty((tokens, kw_width)),
        hidden_states.new_empty((tokens, k_width)),
    )


register_op(OP_NAME, deepseek_indexer, deepseek_indexer_fake)
overlap_possible()  # decided now, at patch time: a constant by the time Dynamo traces us
