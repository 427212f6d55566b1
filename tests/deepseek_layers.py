"""Real DeepSeek-V3 / V3.2 attention layers, tiny and seeded, running upstream's forward on the CPU.

Builds three real vLLM layers with seeded random weights (post-processed like vLLM's loader):

* ``Indexer`` - the legacy DeepSeek-V3.2 lightning indexer (``models/deepseek_v2.py``);
* ``MultiHeadLatentAttentionWrapper`` - with a real ``Indexer`` (V3.2) or without one (V3);
* ``DeepseekV32Attention`` - the V3.2 path of ``vllm/models/deepseek_v32/attention.py``,
  with an indexer, without one (an IndexCache "shared" layer), or with ``skip_topk`` set.

What cannot run on this CPU (Triton kernels, sparse attention, the indexer's top-k op) is
replaced by ``DeepseekStandins``: deterministic plain-torch stand-ins whose outputs depend on
all their tensor inputs and which count their calls. Two runs of one forward on the same layer
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

Self-check: ``python tests/deepseek_layers.py`` (see the bottom of this file).
"""

from __future__ import annotations

import functools
import math
import weakref
from collections import Counter
from contextlib import contextmanager

import torch
from torch import nn

from vllm_overlap.rewrite import Target

DEEPSEEK_V2 = "vllm.model_executor.models.deepseek_v2"
V32_ATTENTION = "vllm.models.deepseek_v32.attention"
V32_ROCM = "vllm.models.deepseek_v32.amd.rocm"
MLA = "vllm.model_executor.layers.mla"
# The functions the DeepSeek features rewrite.
V32_TARGET = Target(V32_ATTENTION, "DeepseekV32Attention.forward")
ROCM_TARGET = Target(V32_ROCM, "DeepseekV32MLAAttention.forward")
INDEXER_TARGET = Target(DEEPSEEK_V2, "Indexer.forward")
WRAPPER_TARGET = Target(MLA, "MultiHeadLatentAttentionWrapper.forward")
INDEXER_ATTRS = {"index_topk": 16, "index_n_heads": 4, "index_head_dim": 128}
INDEXER_BRANCHES = ("rocm_inplace", "fused_q", "default")
FP8 = torch.float8_e4m3fn  # current_platform.fp8_dtype() on the CPU
FP8_MAX = torch.finfo(FP8).max

_built: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layer -> (vllm_config, hf_config)


# --------------------------------------------------------------------------------------------
# Configs and checkpoint
# --------------------------------------------------------------------------------------------


def deepseek_v3_config():
    """The tiny DeepSeek-V3 HF config (``vllm_overlap.tiny_models.deepseek_v3_config``)."""
    from vllm_overlap.tiny_models import deepseek_v3_config as v3

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
    from vllm_overlap.tiny_models import build

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

    def __init__(self):
        self.calls: Counter = Counter()

    def install(self, monkeypatch) -> None:
        """Patch the module globals the forwards look up (undone by ``monkeypatch``)."""
        for module, name in (
            (DEEPSEEK_V2, "per_token_group_quant_fp8"),
            (DEEPSEEK_V2, "fused_indexer_q_rope_quant"),
            (V32_ATTENTION, "fused_norm_rope"),
            (V32_ATTENTION, "fused_q"),
        ):
            monkeypatch.setattr(f"{module}.{name}", getattr(self, name))

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

    # ---- module-global stand-ins ----------------------------------------------------------

    def per_token_group_quant_fp8(
        self,
        x,
        group_size,
        eps=1e-10,
        dtype=None,
        column_major_scales=False,
        tma_aligned_scales=False,
        out_q=None,
        use_ue8m0=None,
    ):
        """The real one falls back to Triton off CUDA/XPU (no Triton here)."""
        assert dtype in (None, FP8) and out_q is None
        assert not column_major_scales and not tma_aligned_scales
        self.calls["per_token_group_quant_fp8"] += 1
        return _quant_fp8(x, group_size, eps, bool(use_ue8m0))

    def fused_indexer_q_rope_quant(
        self, positions, q, cos_sin_cache, weights, softmax_scale, head_scale, is_neox
    ):
        """Index-q RoPE + per-head fp8 quant, weights scaled (the real one is a CUDA Triton
        kernel): ``(q_fp8 like q, weights_out float32 [tokens, heads])``."""
        self.calls["fused_indexer_q_rope_quant"] += 1
        roped = _rope(q, positions, cos_sin_cache, is_neox)
        q_fp8, scale = _quant_fp8(roped, q.shape[-1], 1e-4, True)
        return q_fp8, weights.float() * scale.squeeze(-1) * softmax_scale * head_scale

    def fused_norm_rope(
        self,
        positions,
        q_c,
        q_rms_norm_w,
        q_rms_eps,
        kv_c,
        kv_rms_norm_w,
        kv_rms_eps,
        k_pe,
        k_rope_cos_sin_cache,
        index_k,
        index_k_layer_norm_w,
        index_k_layer_norm_bias,
        index_k_layer_norm_eps,
        index_k_rope_cos_sin_cache,
        topk_indices_buffer,
        slot_mapping=None,
        indexer_slot_mapping=None,
        indexer_k_cache=None,
        indexer_cache_shuffled=False,
        mla_kv_cache=None,
        mla_kv_cache_dtype="auto",
        mla_k_scale=None,
        has_indexer=True,
        index_rope_interleave=False,
        q_c_out=None,
        kv_c_out=None,
        k_pe_out=None,
        index_k_out=None,
    ):
        """q_c / kv_c RMSNorm and k_pe RoPE (GPT-J) as the Triton kernel, into the same outputs.
        Without attention metadata there is no KV cache; the indexer K (LayerNorm + RoPE),
        which the kernel would quantize into the indexer cache, is kept visible as a signature
        written into the top-k buffer's rows (where the kernel writes -1)."""
        assert mla_kv_cache is None and indexer_k_cache is None, "the stand-in has no KV cache"
        self.calls["fused_norm_rope"] += 1
        q_normed = _rms_norm(q_c, q_rms_norm_w, q_rms_eps).to(q_c.dtype)
        if q_c_out is None:
            q_c_out = q_normed
        else:
            q_c_out.copy_(q_normed)
        if kv_c_out is not None:
            kv_c_out.copy_(_rms_norm(kv_c, kv_rms_norm_w, kv_rms_eps))
        if k_pe_out is not None:
            k_pe_out.copy_(_rope(k_pe, positions, k_rope_cos_sin_cache, neox=False))
        if has_indexer:
            k = torch.nn.functional.layer_norm(
                index_k.float(),
                index_k.shape[-1:],
                index_k_layer_norm_w.float(),
                index_k_layer_norm_bias.float(),
                index_k_layer_norm_eps,
            )
            k = _rope(k, positions, index_k_rope_cos_sin_cache, neox=not index_rope_interleave)
            if index_k_out is not None:
                index_k_out.copy_(k)
            tokens, topk = positions.shape[0], topk_indices_buffer.shape[1]
            topk_indices_buffer[:tokens] = _mix(tokens, topk, k).view(torch.int32)
        return q_c_out

    def fused_q(
        self,
        positions,
        q_pe,
        q_pe_cos_sin_cache,
        index_q,
        index_q_cos_sin_cache,
        ql_nope,
        q_scale,
        index_weights,
        index_weights_softmax_scale,
        index_weights_head_scale,
        has_indexer=True,
        index_rope_interleave=False,
        quantize_mqa=True,
    ):
        """MQA q_pe RoPE (GPT-J) and index-q RoPE + fp8 quant + weights, as the Triton kernel:
        ``(index_q_fp8, index_weights_out, mqa_q)``; mqa_q is the fp8 ``[ql_nope; q_pe] /
        q_scale`` when ``quantize_mqa``, else the roped q_pe. Without an indexer the first two
        are the kernel's 1-element placeholders (zeros here)."""
        self.calls["fused_q"] += 1
        q_pe_roped = _rope(q_pe, positions, q_pe_cos_sin_cache, neox=False)
        if quantize_mqa:
            mqa_q = (torch.cat((ql_nope.float(), q_pe_roped), dim=-1) / q_scale).to(FP8)
        else:
            mqa_q = q_pe_roped.to(q_pe.dtype)
        if not has_indexer:
            return torch.zeros((1, 1, 1), dtype=FP8), torch.zeros((1, 1)), mqa_q
        index_q = _rope(index_q, positions, index_q_cos_sin_cache, neox=not index_rope_interleave)
        index_q_fp8, scale = _quant_fp8(index_q, index_q.shape[-1], 1e-4, True)
        weights = index_weights.float() * scale.squeeze(-1)
        return index_q_fp8, weights * index_weights_softmax_scale * index_weights_head_scale, mqa_q

    # ---- per-layer stand-ins --------------------------------------------------------------

    def attach_indexer(self, indexer) -> None:
        """The Indexer's ``indexer_op`` (a submodule: the stand-in is one too)."""
        indexer.indexer_op = _IndexerOpStandin(self.calls, indexer.topk_indices_buffer)

    def attach_mla_attn(self, mla_attn, topk_indices_buffer: torch.Tensor | None) -> None:
        """The wrapper's MLAAttention: its forward becomes a signature of (q, kv_c_normed, k_pe
        and the top-k rows the indexer wrote, when sparse); its impl is counted."""
        calls = self.calls

        def forward(q, kv_c_normed, k_pe, output_shape, q_dcp_replicated=None):
            calls["mla_attn"] += 1
            tokens, width = output_shape
            rows = _topk_rows(topk_indices_buffer, tokens)
            return _mix(tokens, width, q, kv_c_normed, k_pe, q_dcp_replicated, rows).to(q.dtype)

        mla_attn.forward = forward
        mla_attn.impl = _CountingImpl(mla_attn.impl, calls)

    def attach_v32(self, layer) -> None:
        """DeepseekV32Attention: ``_sparse_indexer_and_attn`` (indexer op + sparse MQA, CUDA
        only) writes a signature of all its tensors and the top-k rows into ``output``; its
        impl is counted."""
        calls = self.calls

        def sparse_indexer_and_attn(
            positions,
            q_c,
            q_nope,
            q_pe,
            index_q_fp8,
            index_k,
            index_weights_out,
            kv_c,
            k_pe,
            ql_nope,
            mqa_q,
            output,
        ):
            calls["sparse_indexer_and_attn"] += 1
            layer.impl.record_logical_topk_ready()
            tokens, width = output.shape
            signature = _mix(
                tokens,
                width,
                positions,
                q_c,
                q_nope,
                q_pe,
                index_q_fp8,
                index_k,
                index_weights_out,
                kv_c,
                k_pe,
                ql_nope,
                mqa_q,
                _topk_rows(layer.topk_indices_buffer, tokens),
            )
            output.copy_(signature)

        layer._sparse_indexer_and_attn = sparse_indexer_and_attn
        layer.impl = _CountingImpl(layer.impl, calls)


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------


def _register(layer: nn.Module, vllm_config, hf_config) -> None:
    _built[layer] = (vllm_config, hf_config)


def build_indexer_rope(hf_config, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    from vllm_overlap.site_layers import build_indexer_rope as build

    return build(hf_config, dtype)


def build_indexer(vllm_config, hf_config, *, standins: DeepseekStandins, **kwargs):
    """``site_layers.build_indexer`` with its ``indexer_op`` stood in. Its forward takes the
    ``default`` branch on the CPU; see ``DeepseekStandins.select_indexer_branch`` for the
    others."""
    from vllm_overlap import site_layers

    indexer = site_layers.build_indexer(vllm_config, hf_config, **kwargs)
    _register(indexer, vllm_config, hf_config)
    standins.attach_indexer(indexer)
    return indexer


def build_mla_wrapper(vllm_config, hf_config, with_indexer: bool, *, standins: DeepseekStandins, **kwargs):
    """``site_layers.build_mla_wrapper`` with its MLA attention (and indexer) stood in."""
    from vllm_overlap import site_layers

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
    from vllm_overlap import site_layers

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


# --------------------------------------------------------------------------------------------
# Self-check
# --------------------------------------------------------------------------------------------


def _check(name: str, standins: DeepseekStandins, run, expected: set[str]) -> None:
    """Run ``run(tokens)`` twice for 1 and 7 tokens: bit-identical, finite, every expected
    stand-in called."""
    before = Counter(standins.calls)
    for tokens in (1, 7):
        first, second = run(tokens), run(tokens)
        assert identical(first, second), f"{name}: two runs differ at {tokens} tokens"
        for t in first:
            assert t.shape[0] == tokens, f"{name}: {tuple(t.shape)} for {tokens} tokens"
            assert torch.isfinite(t.float()).all(), f"{name}: non-finite output"
    used = standins.calls - before
    missing = expected - set(used)
    assert not missing, f"{name}: stand-ins not called: {sorted(missing)}"
    print(f"{name:32s} ok  {dict(sorted(used.items()))}")


def _indexer_case(vllm_config, hf, standins, monkeypatch, branch: str):
    from vllm.model_executor.models.deepseek_v2 import Indexer

    indexer = build_indexer(vllm_config, hf, standins=standins, seed=1)
    rope = standins.select_indexer_branch(monkeypatch, indexer, branch, build_indexer_rope(hf))
    quant = "fused_indexer_q_rope_quant" if branch == "fused_q" else "per_token_group_quant_fp8"
    expected = {"indexer_op", quant} | ({"rope_inplace"} if branch == "rocm_inplace" else set())

    def run(tokens):
        positions, _, qr = make_inputs(hf, tokens)
        hidden = make_inputs(hf, tokens, seed=1)[1]
        return run_indexer(Indexer.forward, indexer, hidden, qr, positions, rope)

    return run, expected


def _wrapper_case(vllm_config, hf, standins, monkeypatch, with_indexer: bool):
    from vllm.model_executor.layers.mla import MultiHeadLatentAttentionWrapper

    config = hf if with_indexer else deepseek_v3_config()
    wrapper = build_mla_wrapper(vllm_config, config, with_indexer, standins=standins)
    expected = {"mla_attn"}
    if with_indexer:
        expected |= {"indexer_op", "per_token_group_quant_fp8", "impl.record_logical_topk_ready"}

    def run(tokens):
        positions, hidden, _ = make_inputs(config, tokens)
        forward = MultiHeadLatentAttentionWrapper.forward
        return run_mla_wrapper(forward, wrapper, positions, hidden)

    return run, expected


def _v32_case(vllm_config, hf, standins, monkeypatch, variant: str):
    from vllm.models.deepseek_v32.attention import DeepseekV32Attention

    layer = build_v32_attention(vllm_config, hf, variant != "no_indexer", standins=standins)
    layer.skip_topk = variant == "skip_topk"
    expected = {
        "fused_norm_rope",
        "fused_q",
        "sparse_indexer_and_attn",
        "impl.prepare_for_batch",
        "impl.record_logical_topk_ready",
    }

    def run(tokens):
        positions, hidden, _ = make_inputs(hf, tokens)
        return run_v32(DeepseekV32Attention.forward, layer, positions, hidden)

    return run, expected


def main() -> None:
    """Build every layer variant (fresh stand-ins and module patches each) and ``_check`` it."""
    import tempfile

    import pytest

    from vllm_overlap.layer_bench import standalone_vllm

    cases = (
        [(f"Indexer[{branch}]", _indexer_case, branch) for branch in INDEXER_BRANCHES]
        + [(f"MLAWrapper[indexer={w}]", _wrapper_case, w) for w in (False, True)]
        + [
            (f"DeepseekV32Attention[{variant}]", _v32_case, variant)
            for variant in ("indexer", "no_indexer", "skip_topk")
        ]
    )
    hf = deepseek_v32_config()
    with tempfile.TemporaryDirectory() as tmp, standalone_vllm(build_checkpoint(tmp)) as config:
        for name, case, arg in cases:
            with pytest.MonkeyPatch.context() as monkeypatch:
                standins = DeepseekStandins()
                standins.install(monkeypatch)
                run, expected = case(config, hf, standins, monkeypatch, arg)
                _check(name, standins, run, expected)
    print("all DeepSeek layers ok")


if __name__ == "__main__":
    main()
