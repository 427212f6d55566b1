"""Runtime of gdn_in_proj: ``torch.ops.vllm_overlap.gdn_in_proj`` and the call the rewrite makes.

The rewritten forwards call :func:`in_proj` in place of::

    mixed_qkvz, _ = self.in_proj_qkvz(hidden_states)
    ba, _ = self.in_proj_ba(hidden_states)

The op runs under torch.compile (Dynamo sees only the op); its fake kernel returns
contiguous ``[*tokens, width]`` tensors of the input dtype, widths being the projections'
per-rank ``output_size_per_partition`` set at layer init (never read from the weights, which
quantisation may repack).
"""

from __future__ import annotations

import torch

from .. import state, streams
from . import (
    LayerNameType,
    check_output,
    encode_layer_name,
    any_lora,
    overlap_possible,
    register_op,
    resolve_layer,
)

OP_NAME = "gdn_in_proj"


def _per_rank_width(proj: torch.nn.Module) -> int:
    return proj.output_size_per_partition


def in_proj(layer: torch.nn.Module, hidden_states: torch.Tensor):
    """(in_proj_qkvz(h), in_proj_ba(h)) outputs, overlapped where the config allows."""
    if not overlap_possible() or any_lora(layer.in_proj_qkvz, layer.in_proj_ba):
        # No second stream on this platform (nothing to overlap, so nothing to pay), or
        # LoRA, whose per-request punica kernels are not verified on two streams.
        return upstream(layer, hidden_states)
    if torch.compiler.is_compiling():  # Dynamo must see one opaque op, not streams
        return torch.ops.vllm_overlap.gdn_in_proj(
            hidden_states,
            _per_rank_width(layer.in_proj_qkvz),
            _per_rank_width(layer.in_proj_ba),
            encode_layer_name(layer.prefix),
        )
    # Eager: the op's body without the dispatcher round trip and without the output check,
    # which guards the fake kernel's promise to compiled graphs (about 10 us each a call).
    return _overlapped(layer, hidden_states)


def upstream(layer, hidden_states):
    """The two statements the rewrite replaced, unchanged."""
    mixed_qkvz, _ = layer.in_proj_qkvz(hidden_states)
    ba, _ = layer.in_proj_ba(hidden_states)
    return mixed_qkvz, ba


def _overlapped(layer, hidden_states):
    return streams.run_pair(
        OP_NAME,
        lambda: layer.in_proj_qkvz(hidden_states)[0],
        lambda: layer.in_proj_ba(hidden_states)[0],
        hidden_states.shape[0],
        state.feature_config(OP_NAME),
    )


def _checked(mixed_qkvz, ba, hidden_states, qkvz_width: int, ba_width: int):
    return (
        check_output(mixed_qkvz, hidden_states, qkvz_width, "in_proj_qkvz"),
        check_output(ba, hidden_states, ba_width, "in_proj_ba"),
    )


def fused_in_proj(layer: torch.nn.Module, hidden_states: torch.Tensor):
    """mode fused: one GEMM over the concatenated weights, then a split.

    Outputs are made contiguous (a no-op for one token, where the split halves already are)
    so every variant's kernels see the layout they get upstream. A layer the post-load step
    did not fuse runs the configured fallback.
    """
    fused = getattr(layer, "vllm_overlap_in_proj_qkvz_ba", None)
    if fused is None:
        if state.feature_config(OP_NAME).fused_fallback == "dual_stream":
            return in_proj(layer, hidden_states)
        return upstream(layer, hidden_states)
    out, _ = fused(hidden_states)
    mixed_qkvz, ba = out.split(layer._vllm_overlap_widths, dim=-1)
    return mixed_qkvz.contiguous(), ba.contiguous()


def gdn_in_proj(
    hidden_states: torch.Tensor,
    qkvz_width: int,
    ba_width: int,
    layer_name: LayerNameType,
) -> tuple[torch.Tensor, torch.Tensor]:
    mixed_qkvz, ba = _overlapped(resolve_layer(layer_name), hidden_states)
    return _checked(mixed_qkvz, ba, hidden_states, qkvz_width, ba_width)


def gdn_in_proj_fake(
    hidden_states: torch.Tensor,
    qkvz_width: int,
    ba_width: int,
    layer_name: LayerNameType,
) -> tuple[torch.Tensor, torch.Tensor]:
    lead = hidden_states.shape[:-1]
    return (
        hidden_states.new_empty((*lead, qkvz_width)),
        hidden_states.new_empty((*lead, ba_width)),
    )


register_op(OP_NAME, gdn_in_proj, gdn_in_proj_fake)
overlap_possible()  # decided now, at patch time: a constant by the time Dynamo traces in_proj
