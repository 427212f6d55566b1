"""Runtime of mla_q_b_proj: the MLA q path on the aux stream beside the indexer's q path.

Two code shapes call in here; neither needs a custom op.

**V3.2 CUDA path** (``DeepseekV32Attention.forward``): :func:`q_b_proj_beside_index_q`
replaces the q path (``q_b_proj(q_c)``, its view and split, and the ``W_UK_T`` bmm when the
MQA query is prepared) and the indexer's ``wq_b(q_c)`` with its view. This forward runs
without Dynamo under breakable CUDA graphs, so it is a plain call of the stream primitive:
fork and join both happen inside this call (no fork spans an eager break), and during
breakable capture vLLM's ``maybe_execute_in_parallel`` runs it serially.

**Legacy path** (``MultiHeadLatentAttentionWrapper.forward`` in layers/mla.py):
:func:`q_proj_beside_indexer` replaces the q projection, its view and the MLA RoPE, and the
``self.indexer(...)`` call. The indexer call contains ``vllm::sparse_attn_indexer``, one of
vLLM's CUDA-graph splitting ops: under torch.compile it runs eagerly between captured
pieces, so a fork around it would span an eager break. Therefore the region overlaps only
where it runs eagerly (``enforce_eager``; vLLM's capture check still applies) and runs the
upstream statements, serially, whenever Dynamo traces it: no custom op, the compiled graph
is upstream's.

Both run the upstream statements serially where the layer has no active indexer
(DeepSeek-V3/R1 MLA, or a V3.2 layer that reuses an earlier layer's top-k): there is no
second GEMM worth a fork there.
"""

from __future__ import annotations

import torch

from .. import state, streams
from . import any_lora, overlap_possible
from .deepseek_indexer import has_active_indexer

OP_NAME = "mla_q_b_proj"


def _feature():
    return state.feature_config(OP_NAME)


# --------------------------------------------------------------------------- V3.2 CUDA path


def _v32_q_path(layer, q_c, prepare_mqa_query):
    q = layer.q_b_proj(q_c)[0].view(-1, layer.num_local_heads, layer.qk_head_dim)
    q_nope, q_pe = q.split([layer.qk_nope_head_dim, layer.qk_rope_head_dim], dim=-1)
    if prepare_mqa_query:
        ql_nope = torch.bmm(q_nope.transpose(0, 1), layer.W_UK_T).transpose(0, 1)
    else:
        ql_nope = q_nope
    return q, q_nope, q_pe, ql_nope


def _v32_index_q(layer, q_c):
    index_q = layer.indexer.wq_b(q_c)[0]
    return index_q.view(-1, layer.indexer.n_head, layer.indexer.head_dim)


def q_b_proj_beside_index_q(layer, q_c: torch.Tensor, prepare_mqa_query: bool):
    """((q, q_nope, q_pe, ql_nope), index_q or None), as upstream computes them."""
    if not has_active_indexer(layer):
        return _v32_q_path(layer, q_c, prepare_mqa_query), None
    if (
        not overlap_possible()
        or torch.compiler.is_compiling()
        or any_lora(layer.q_b_proj, layer.indexer.wq_b)
    ):
        return _v32_q_path(layer, q_c, prepare_mqa_query), _v32_index_q(layer, q_c)
    index_q, q_outputs = streams.run_pair(
        OP_NAME,
        lambda: _v32_index_q(layer, q_c),
        lambda: _v32_q_path(layer, q_c, prepare_mqa_query),
        q_c.shape[0],
        _feature(),
    )
    return q_outputs, index_q


# --------------------------------------------------------------------------- legacy path


def wrapper_has_active_indexer(layer) -> bool:
    """The condition upstream's MLA wrapper uses for calling its indexer."""
    return bool(layer.indexer and layer.is_sparse and not layer.skip_topk)


def _legacy_q_path(layer, q_proj_layer, q_proj_input, positions, k_pe):
    q = q_proj_layer(q_proj_input)[0]
    heads = layer.num_heads
    if layer.dcp_q_replicate:
        heads *= q_proj_layer.group_size
    q = q.view(-1, heads, layer.qk_head_dim)

    if layer.rotary_emb is not None:
        q[..., layer.qk_nope_head_dim :], k_pe = layer.rotary_emb(
            positions, q[..., layer.qk_nope_head_dim :], k_pe
        )
    return q, heads, k_pe


def _legacy_indexer(layer, hidden_states, q_c, positions) -> None:
    layer.indexer(hidden_states, q_c, positions, layer.indexer_rope_emb)


def q_proj_beside_indexer(
    layer, q_proj_layer, q_proj_input, positions, k_pe, hidden_states, q_c
):
    """(q, heads, k_pe) after the q projection and RoPE; the indexer has run too."""
    if not wrapper_has_active_indexer(layer):
        return _legacy_q_path(layer, q_proj_layer, q_proj_input, positions, k_pe)
    if (
        not overlap_possible()
        or torch.compiler.is_compiling()  # a fork must not span sparse_attn_indexer
        or any_lora(q_proj_layer)
    ):
        out = _legacy_q_path(layer, q_proj_layer, q_proj_input, positions, k_pe)
        _legacy_indexer(layer, hidden_states, q_c, positions)
        return out
    _, out = streams.run_pair(
        OP_NAME,
        lambda: _legacy_indexer(layer, hidden_states, q_c, positions),
        lambda: _legacy_q_path(layer, q_proj_layer, q_proj_input, positions, k_pe),
        hidden_states.shape[0],
        _feature(),
    )
    return out


overlap_possible()  # decided now, at patch time: a constant by the time Dynamo traces us
