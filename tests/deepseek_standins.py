"""Deterministic plain-torch stand-ins for what the DeepSeek layers cannot run on the CPU
(Triton kernels, sparse attention, the indexer's top-k op), and the math they share.

Each stand-in's output depends on all its tensor inputs (``_mix``: fixed random combinations),
so a forward compared with another sees every input reach every kernel, and each counts its
calls. Module-global kernels and per-layer methods are stood in through
``kernel_standin.standin``: called with the real kernel's own signature, written by meaning.
``tests/test_deepseek_standins.py`` checks every layer variant runs through them.
"""

from __future__ import annotations

import functools
import importlib
import math
from collections import Counter

import torch
from kernel_standin import standin
from torch import nn

DEEPSEEK_V2 = "vllm.model_executor.models.deepseek_v2"
V32_ATTENTION = "vllm.models.deepseek_v32.attention"
INDEXER_BRANCHES = ("rocm_inplace", "fused_q", "default")
FP8 = torch.float8_e4m3fn  # current_platform.fp8_dtype() on the CPU
FP8_MAX = torch.finfo(FP8).max

# --------------------------------------------------------------------------------------------
# Plain-torch math shared by the stand-ins
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _projection(inputs: int, width: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(inputs * 100_003 + width)
    return torch.randn(inputs, width, generator=gen, dtype=torch.float64) / math.sqrt(inputs)


def _mix(tokens: int, width: int, *tensors: torch.Tensor | None) -> torch.Tensor:
    """A float32 ``[tokens, width]``: per token, fixed random combinations of every element of
    every tensor (token-major tensors by row; any other tensor is seen by every token). Each
    tensor is scaled to a largest magnitude of 1 first, so a small one (the indexer's head
    weights are ~1e-4) still moves the result by more than a bf16 ulp."""
    columns = []
    for t in tensors:
        if t is None:
            continue
        t = t.detach().float().double()
        t = t / t.abs().max().clamp_min(1e-30) if t.numel() else t
        if t.dim() > 0 and t.shape[0] == tokens:
            columns.append(t.reshape(tokens, -1))
        else:
            columns.append(t.reshape(1, -1).expand(tokens, -1))
    flat = torch.cat(columns, dim=1)
    return (flat @ _projection(flat.shape[1], width)).float()


def _topk_rows(buffer: torch.Tensor | None, tokens: int) -> torch.Tensor | None:
    """The first ``tokens`` rows of an int32 top-k buffer as exact, finite float64 values."""
    return None if buffer is None else buffer[:tokens].double() * 2.0**-31


def _rope(x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, neox: bool):
    """Rotate the first ``cos_sin_cache.shape[-1]`` features of ``x`` ([tokens, ..., dim]) at
    ``positions`` (NeoX halves or GPT-J interleaved pairs); float32 result."""
    rot = cos_sin_cache.shape[-1]
    cos, sin = cos_sin_cache.float()[positions].chunk(2, dim=-1)
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (rot // 2,)
    cos, sin = cos.view(shape), sin.view(shape)
    xf = x.float()
    part, rest = xf[..., :rot], xf[..., rot:]
    x1, x2 = part.chunk(2, dim=-1) if neox else (part[..., 0::2], part[..., 1::2])
    r1, r2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    rotated = torch.cat((r1, r2), dim=-1) if neox else torch.stack((r1, r2), dim=-1).flatten(-2)
    return torch.cat((rotated, rest), dim=-1)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


def _quant_fp8(x: torch.Tensor, group: int, eps: float, ue8m0: bool):
    """Per-group fp8 quantization of the last dim: ``(fp8 values, float32 scales [..., n/group])``,
    scales rounded up to powers of two when ``ue8m0`` (as the Triton kernels do)."""
    xf = x.float().unflatten(-1, (-1, group))
    scale = xf.abs().amax(-1, keepdim=True).clamp(min=eps) / FP8_MAX
    if ue8m0:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    q = (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).flatten(-2)
    return q, scale.squeeze(-1)


# --------------------------------------------------------------------------------------------
# Stand-ins
# --------------------------------------------------------------------------------------------


class _RocmPlatform:
    """``current_platform`` as ``deepseek_v2`` sees it when a test forces ROCm."""

    def __init__(self, platform):
        self._platform = platform

    def is_rocm(self) -> bool:
        return True

    def __getattr__(self, name):
        if name == "_platform":  # not set yet (copying)
            raise AttributeError(name)
        return getattr(self._platform, name)


class InplaceRope(nn.Module):
    """A real rotary embedding made to rotate ``query``/``key`` in place, as the CUDA/ROCm
    custom op does (the Indexer's ROCm branch ignores the return value). On the CPU the rope
    runs ``forward_native``, which returns new tensors, and the CPU in-place op
    (``torch.ops._C.rotary_embedding``) mis-rotates a ``[tokens, heads, dim]`` query, so the
    rotation is ``forward_native``'s, copied back into the inputs."""

    def __init__(self, rope: nn.Module, calls: Counter):
        super().__init__()
        self.rope = rope
        self.calls = calls

    def forward(self, positions, query, key=None):
        self.calls["rope_inplace"] += 1
        q, k = self.rope.forward_native(positions, query, key)
        query.copy_(q)
        if key is not None:
            key.copy_(k)
        return query, key


class _IndexerOpStandin(nn.Module):
    """Stands in for ``SparseAttnIndexer`` (needs DeepGEMM / a CPU attention backend and
    metadata): writes a float32 signature of all its inputs, bit-cast to int32, into the top-k
    buffer's rows, and returns the buffer as the real op does."""

    def __init__(self, calls: Counter, topk_indices_buffer: torch.Tensor):
        super().__init__()
        self.calls = calls
        self.topk_indices_buffer = topk_indices_buffer

    def forward(self, hidden_states, q_fp8, k, weights):
        self.calls["indexer_op"] += 1
        tokens, topk = hidden_states.shape[0], self.topk_indices_buffer.shape[1]
        signature = _mix(tokens, topk, hidden_states, q_fp8, k, weights)
        self.topk_indices_buffer[:tokens] = signature.view(torch.int32)
        return self.topk_indices_buffer


class _CountingImpl:
    """An attention impl whose batch hooks are counted (and ``record_logical_topk_ready``,
    which the CPU MLA impl lacks, provided); everything else is the real impl's."""

    def __init__(self, impl, calls: Counter):
        self._impl = impl
        self._calls = calls

    def prepare_for_batch(self, attn_metadata) -> None:
        self._calls["impl.prepare_for_batch"] += 1
        self._impl.prepare_for_batch(attn_metadata)

    def record_logical_topk_ready(self) -> None:
        self._calls["impl.record_logical_topk_ready"] += 1

    def __getattr__(self, name):
        if name == "_impl":  # not set yet (copying)
            raise AttributeError(name)
        return getattr(self._impl, name)


class DeepseekStandins:
    """Deterministic plain-torch stand-ins for what the DeepSeek layers cannot run on the CPU;
    ``calls`` counts each one's uses.

    Module globals (``install``): ``per_token_group_quant_fp8`` and
    ``fused_indexer_q_rope_quant`` in ``deepseek_v2``; ``fused_norm_rope`` and ``fused_q`` in
    ``deepseek_v32.attention``. Per layer (the builders attach them): the Indexer's
    ``indexer_op``, the MLA wrapper's ``mla_attn.forward`` / ``mla_attn.impl``, and
    DeepseekV32Attention's ``_sparse_indexer_and_attn`` / ``impl``.
    """

    GLOBALS = (
        (DEEPSEEK_V2, "per_token_group_quant_fp8"),
        (DEEPSEEK_V2, "fused_indexer_q_rope_quant"),
        (V32_ATTENTION, "fused_norm_rope"),
        (V32_ATTENTION, "fused_q"),
    )

    def __init__(self):
        self.calls: Counter = Counter()

    def install(self, monkeypatch) -> None:
        """Patch the module globals the forwards look up (undone by ``monkeypatch``)."""
        for module, name in self.GLOBALS:
            real = getattr(importlib.import_module(module), name)
            monkeypatch.setattr(f"{module}.{name}", standin(real, getattr(self, name), self.calls, name))

    def select_indexer_branch(self, monkeypatch, indexer, branch: str, rotary_emb: nn.Module):
        """Make ``Indexer.forward`` take ``branch`` of ``INDEXER_BRANCHES`` and return the
        rotary embedding to pass it (``rotary_emb``, or for ``rocm_inplace`` an in-place one):

        * ``rocm_inplace``: ``current_platform.is_rocm()`` forced True in ``deepseek_v2``
          (through ``monkeypatch``) and ``is_inplace_rope`` set;
        * ``fused_q``: ``use_fused_indexer_q`` set (vLLM sets it on CUDA only);
        * ``default``: both cleared - what the CPU builds.
        """
        if branch not in INDEXER_BRANCHES:
            raise ValueError(f"unknown Indexer branch {branch!r}: one of {INDEXER_BRANCHES}")
        indexer.is_inplace_rope = branch == "rocm_inplace"
        indexer.use_fused_indexer_q = branch == "fused_q"
        if branch != "rocm_inplace":
            return rotary_emb
        import vllm.model_executor.models.deepseek_v2 as deepseek_v2

        rocm = _RocmPlatform(deepseek_v2.current_platform)
        monkeypatch.setattr(deepseek_v2, "current_platform", rocm)
        rope = rotary_emb.rope if isinstance(rotary_emb, InplaceRope) else rotary_emb
        return InplaceRope(rope, self.calls)

    # ---- module-global stand-ins (bodies: called by keyword, see kernel_standin) ---------------

    def per_token_group_quant_fp8(
        self, *, x, group_size, eps, dtype, column_major_scales, tma_aligned_scales, out_q, use_ue8m0, **_
    ):
        """The real one falls back to Triton off CUDA/XPU (no Triton here)."""
        assert dtype in (None, FP8) and out_q is None
        assert not column_major_scales and not tma_aligned_scales
        return _quant_fp8(x, group_size, eps, bool(use_ue8m0))

    def fused_indexer_q_rope_quant(
        self, *, positions, q, cos_sin_cache, weights, softmax_scale, head_scale, is_neox, **_
    ):
        """Index-q RoPE + per-head fp8 quant, weights scaled (the real one is a CUDA Triton
        kernel): ``(q_fp8 like q, weights_out float32 [tokens, heads])``."""
        roped = _rope(q, positions, cos_sin_cache, is_neox)
        q_fp8, scale = _quant_fp8(roped, q.shape[-1], 1e-4, True)
        return q_fp8, weights.float() * scale.squeeze(-1) * softmax_scale * head_scale

    def fused_norm_rope(self, *, positions, q_c, kv_c, k_pe, index_k, topk_indices_buffer, **a):
        """q_c / kv_c RMSNorm and k_pe RoPE (GPT-J) as the Triton kernel, into the same outputs.
        Without attention metadata there is no KV cache; the indexer K (LayerNorm + RoPE),
        which the kernel would quantize into the indexer cache, is kept visible as a signature
        written into the top-k buffer's rows (where the kernel writes -1). ``a``: the
        kernel's norm weights, epsilons, rope caches, caches, flags and out tensors by name."""
        assert a["mla_kv_cache"] is None and a["indexer_k_cache"] is None, "the stand-in has no KV cache"
        q_normed = _rms_norm(q_c, a["q_rms_norm_w"], a["q_rms_eps"]).to(q_c.dtype)
        q_c_out = a["q_c_out"]
        if q_c_out is None:
            q_c_out = q_normed
        else:
            q_c_out.copy_(q_normed)
        if a["kv_c_out"] is not None:
            a["kv_c_out"].copy_(_rms_norm(kv_c, a["kv_rms_norm_w"], a["kv_rms_eps"]))
        if a["k_pe_out"] is not None:
            a["k_pe_out"].copy_(_rope(k_pe, positions, a["k_rope_cos_sin_cache"], neox=False))
        if a["has_indexer"]:
            k = torch.nn.functional.layer_norm(
                index_k.float(),
                index_k.shape[-1:],
                a["index_k_layer_norm_w"].float(),
                a["index_k_layer_norm_bias"].float(),
                a["index_k_layer_norm_eps"],
            )
            neox = not a["index_rope_interleave"]
            k = _rope(k, positions, a["index_k_rope_cos_sin_cache"], neox=neox)
            if a["index_k_out"] is not None:
                a["index_k_out"].copy_(k)
            tokens, topk = positions.shape[0], topk_indices_buffer.shape[1]
            topk_indices_buffer[:tokens] = _mix(tokens, topk, k).view(torch.int32)
        return q_c_out

    def fused_q(self, *, positions, q_pe, q_pe_cos_sin_cache, ql_nope, q_scale, has_indexer, **a):
        """MQA q_pe RoPE (GPT-J) and index-q RoPE + fp8 quant + weights, as the Triton kernel:
        ``(index_q_fp8, index_weights_out, mqa_q)``; mqa_q is the fp8 ``[ql_nope; q_pe] /
        q_scale`` when ``quantize_mqa``, else the roped q_pe. Without an indexer the first two
        are the kernel's 1-element placeholders (zeros here)."""
        q_pe_roped = _rope(q_pe, positions, q_pe_cos_sin_cache, neox=False)
        if a["quantize_mqa"]:
            mqa_q = (torch.cat((ql_nope.float(), q_pe_roped), dim=-1) / q_scale).to(FP8)
        else:
            mqa_q = q_pe_roped.to(q_pe.dtype)
        if not has_indexer:
            return torch.zeros((1, 1, 1), dtype=FP8), torch.zeros((1, 1)), mqa_q
        neox = not a["index_rope_interleave"]
        index_q = _rope(a["index_q"], positions, a["index_q_cos_sin_cache"], neox=neox)
        index_q_fp8, scale = _quant_fp8(index_q, index_q.shape[-1], 1e-4, True)
        weights = a["index_weights"].float() * scale.squeeze(-1)
        return index_q_fp8, weights * a["index_weights_softmax_scale"] * a["index_weights_head_scale"], mqa_q

    # ---- per-layer stand-ins --------------------------------------------------------------

    def attach_indexer(self, indexer) -> None:
        """The Indexer's ``indexer_op`` (a submodule: the stand-in is one too)."""
        indexer.indexer_op = _IndexerOpStandin(self.calls, indexer.topk_indices_buffer)

    def attach_mla_attn(self, mla_attn, topk_indices_buffer: torch.Tensor | None) -> None:
        """The wrapper's MLAAttention: its forward becomes a signature of every tensor it is
        given and the top-k rows the indexer wrote, when sparse; its impl is counted."""

        def forward(*, q, output_shape, **tensors):
            tokens, width = output_shape
            rows = _topk_rows(topk_indices_buffer, tokens)
            return _mix(tokens, width, q, *tensors.values(), rows).to(q.dtype)

        mla_attn.forward = standin(mla_attn.forward, forward, self.calls, "mla_attn")
        mla_attn.impl = _CountingImpl(mla_attn.impl, self.calls)

    def attach_v32(self, layer) -> None:
        """DeepseekV32Attention: ``_sparse_indexer_and_attn`` (indexer op + sparse MQA, CUDA
        only) writes a signature of every tensor it is given and the top-k rows into
        ``output``; its impl is counted."""

        def sparse_indexer_and_attn(*, output, **tensors):
            layer.impl.record_logical_topk_ready()
            tokens, width = output.shape
            rows = _topk_rows(layer.topk_indices_buffer, tokens)
            output.copy_(_mix(tokens, width, *tensors.values(), rows))

        real = layer._sparse_indexer_and_attn
        layer._sparse_indexer_and_attn = standin(real, sparse_indexer_and_attn, self.calls, "sparse_indexer_and_attn")
        layer.impl = _CountingImpl(layer.impl, self.calls)
