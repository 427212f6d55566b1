"""Each site's real vLLM layer, built outside the engine at a model's per-rank shapes, and the
arguments its entry takes at n tokens: what the layer benchmark, ``calibrate`` and the tests'
site harness run.

Layers get seeded random weights (norm weights near 1), then vLLM's own post-load processing
(``process_weights_like_the_loader``), and are registered under their prefix, so an op site's
``LayerName`` resolves to them. Nothing here stands in for a kernel: what a site's branches
call runs for real; a site whose branches need the engine (attention metadata, a KV cache)
says so in ``SiteLayer.unmeasured`` and is measured end to end only.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from vllm_overlap.runtime.layer_registry import register_layer

_layer_ids = itertools.count()  # vLLM refuses two layers of one name in a config

# The lightning indexer's attributes: vLLM treats a DeepSeek config with index_topk as V3.2.
INDEXER_ATTRS = ("index_topk", "index_n_heads", "index_head_dim")


def process_weights_like_the_loader(module: torch.nn.Module, vllm_config, *, attention: bool = True) -> None:
    """What vLLM's loader runs on a model after loading its weights, run on ``module``: vLLM's
    own ``process_weights_after_loading`` (quant methods, then deferred attention layers).

    This is where vLLM picks a platform's GEMM path (on the CPU: by ISA and vendor, packing
    or dropping ``weight``), so a layer built by hand runs what a loaded model runs only
    after it, whichever machine this is. The layer goes in as the one child of a plain
    container, as it sits inside a model: the loader's model-level hook is for models.

    ``attention=False``, for an attention layer whose attention kernel the tests stand in:
    the quant methods' step on its submodules only, not the layer's own step, which prepares
    that kernel's weights (an MLA layer splits ``kv_b_proj`` into W_UK / W_UV) and cannot run
    where vLLM's CPU GEMM path has dropped ``kv_b_proj.weight`` (oneDNN, and the AMX
    small-GEMM kernel in bf16): upstream's loader stops there too."""
    from vllm.model_executor.model_loader.utils import process_weights_after_loading

    device = next(module.parameters()).device
    model = torch.nn.ModuleDict({"layer": module} if attention else dict(module.named_children()))
    # vLLM's own, not the plugin's wrapper of it: building a layer is not loading a model
    vllm_step = getattr(process_weights_after_loading, "__wrapped__", process_weights_after_loading)
    vllm_step(model, vllm_config.model_config, device)


def build_gdn_layer(
    vllm_config,
    hf_config=None,
    *,
    interleaved: bool | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    seed: int = 0,
    process_weights: bool = True,
):
    """A real QwenGatedDeltaNetAttention with seeded random weights, findable by the
    overlay's ops under its prefix, and post-processed like vLLM's loader does (unless
    ``process_weights`` is false: then as the loader has it just before that step)."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers.mamba.gdn.qwen_gdn_linear_attn import (
        QwenGatedDeltaNetAttention,
    )

    hf_config = hf_config or vllm_config.model_config.hf_text_config
    if interleaved is None:  # Qwen3-Next stores qkvz interleaved; Qwen3.5 does not
        interleaved = getattr(hf_config, "model_type", "") == "qwen3_next"
    prefix = f"overlay.layers.{next(_layer_ids)}.linear_attn"
    with set_current_vllm_config(vllm_config):
        layer = QwenGatedDeltaNetAttention(
            hf_config, vllm_config, prefix=prefix, gqa_interleaved_layout=interleaved
        )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in layer.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    layer = layer.to(device=device, dtype=dtype)
    if process_weights:
        process_weights_like_the_loader(layer, vllm_config)
    register_layer(prefix, layer)
    return layer


# ---------------------------------------------------------------------------------------------
# DeepSeek-V3 / V3.2 attention
# ---------------------------------------------------------------------------------------------


def _prefix() -> str:
    """A fresh attention-layer prefix with layer index 0 (vLLM reads the index from it)."""
    return f"deepseek{next(_layer_ids)}.layers.0.self_attn"


def topk_buffer(vllm_config, hf_config, device="cpu") -> torch.Tensor:
    """The shared top-k indices buffer, shaped as DeepseekV2Model allocates it."""
    rows = vllm_config.scheduler_config.max_num_batched_tokens
    return torch.full((rows, hf_config.index_topk), -1, dtype=torch.int32, device=device)


def _seed_weights(layer: torch.nn.Module, vllm_config, seed: int, *, attention: bool = True) -> None:
    """Seeded weights (norm weights near 1), then what vLLM's loader does after loading:
    the quant methods' processing (which picks the machine's GEMM path), then, unless
    ``attention`` is false, the attention layers' (which sets W_UK_T / W_UV from kv_b_proj)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in layer.named_parameters():
            noise = torch.randn(param.shape, generator=gen) * 0.05
            value = noise + 1.0 if param.dim() == 1 and name.endswith("weight") else noise
            param.copy_(value.to(param.device))
    process_weights_like_the_loader(layer, vllm_config, attention=attention)


@contextmanager
def building(vllm_config, dtype: torch.dtype, device="cpu") -> Iterator:
    """What a layer's ``__init__`` runs under in vLLM's loader: the config, the default dtype
    and the target device."""
    from vllm.config import set_current_vllm_config
    from vllm.utils.torch_utils import set_default_torch_dtype

    with set_current_vllm_config(vllm_config), set_default_torch_dtype(dtype), torch.device(device):
        yield


def build_indexer_rope(hf_config, dtype: torch.dtype = torch.bfloat16, device="cpu"):
    """The indexer's rotary embedding, as DeepseekV2MLAAttention builds ``indexer_rope_emb``."""
    from vllm.model_executor.layers.rotary_embedding import get_rope
    from vllm.utils.torch_utils import set_default_torch_dtype

    with set_default_torch_dtype(dtype), torch.device(device):
        return get_rope(
            hf_config.qk_rope_head_dim,
            max_position=hf_config.max_position_embeddings,
            rope_parameters=hf_config.rope_parameters,
            is_neox_style=not getattr(hf_config, "indexer_rope_interleave", False),
        )


def build_indexer(
    vllm_config,
    hf_config,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device="cpu",
    seed: int = 0,
    prefix: str | None = None,
    topk_indices_buffer: torch.Tensor | None = None,
):
    """A real deepseek_v2 ``Indexer`` (``hf_config`` with the indexer attributes), seeded and
    registered under its prefix, as the overlay's post-load step registers it."""
    from vllm.model_executor.models.deepseek_v2 import Indexer

    if topk_indices_buffer is None:
        topk_indices_buffer = topk_buffer(vllm_config, hf_config, device)
    with building(vllm_config, dtype, device):
        indexer = Indexer(
            vllm_config,
            hf_config,
            hf_config.hidden_size,
            hf_config.q_lora_rank,
            None,
            vllm_config.cache_config,
            topk_indices_buffer,
            prefix or f"{_prefix()}.indexer",
        )  # is_inplace_rope (0.23+) keeps its default, False: 0.20-0.22 do not take it
    _seed_weights(indexer, vllm_config, seed)
    register_layer(indexer.prefix, indexer)
    return indexer


def build_mla_wrapper(
    vllm_config,
    hf_config,
    with_indexer: bool,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device="cpu",
    seed: int = 0,
):
    """A real ``MultiHeadLatentAttentionWrapper``, built by ``DeepseekV2MLAAttention`` as for
    DeepSeek-V3 (the CPU platform refuses a sparse MLA backend); ``with_indexer`` then makes it
    V3.2's: a real ``Indexer`` (seed + 1), its rope, the shared top-k buffer and
    ``is_sparse``, set as the wrapper's ``__init__`` sets them."""
    from vllm.model_executor.models.deepseek_v2 import DeepseekV2MLAAttention

    dense_config = copy.deepcopy(hf_config)
    for name in INDEXER_ATTRS:
        if hasattr(dense_config, name):
            delattr(dense_config, name)
    prefix = _prefix()
    with building(vllm_config, dtype, device):
        attention = DeepseekV2MLAAttention(
            vllm_config,
            dense_config,
            **mla_sizes(hf_config),
            max_position_embeddings=hf_config.max_position_embeddings,
            cache_config=vllm_config.cache_config,
            prefix=prefix,
        )
    wrapper = attention.mla_attn
    _seed_weights(wrapper, vllm_config, seed)
    if with_indexer:
        buffer = topk_buffer(vllm_config, hf_config, device)
        wrapper.indexer = build_indexer(
            vllm_config,
            hf_config,
            dtype=dtype,
            device=device,
            seed=seed + 1,
            prefix=f"{prefix}.indexer",
            topk_indices_buffer=buffer,
        )
        wrapper.indexer_rope_emb = build_indexer_rope(hf_config, dtype, device)
        wrapper.is_sparse = True
        wrapper.topk_tokens = hf_config.index_topk
        wrapper.topk_indices_buffer = buffer
        wrapper.mla_attn.indexer = wrapper.indexer
        wrapper.mla_attn.use_sparse = True
    return wrapper


def build_v32_attention(
    vllm_config,
    hf_config,
    with_indexer: bool = True,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device="cpu",
    seed: int = 0,
    attn_backend=None,
):
    """A real ``DeepseekV32Attention`` (``hf_config`` with the indexer attributes). Without an
    indexer it is an IndexCache shared layer (``index_topk_pattern`` "S": ``indexer`` None,
    reusing the top-k buffer). ``attn_backend``: vLLM's choice when None (the CPU platform
    refuses sparse MLA: pass its MLA backend there)."""
    from vllm.models.deepseek_v32.attention import DeepseekV32Attention

    config = copy.deepcopy(hf_config)
    config.index_topk_pattern = "F" if with_indexer else "S"
    with building(vllm_config, dtype, device):
        layer = DeepseekV32Attention(
            vllm_config,
            config,
            _prefix(),
            topk_indices_buffer=topk_buffer(vllm_config, config, device),
            attn_backend=attn_backend,
        )
    _seed_weights(layer, vllm_config, seed)
    return layer


def _built(vllm_config, make, prefix: str, *, dtype, device, seed: int, register: bool, attention: bool = True):
    """``make(prefix)`` run as vLLM's loader builds a layer, seeded and post-processed like the
    loader (``attention``: as in :func:`process_weights_like_the_loader`); ``register``:
    findable by its prefix outside a forward context too."""
    with building(vllm_config, dtype, device):
        layer = make(prefix)
    _seed_weights(layer, vllm_config, seed, attention=attention)
    if register:
        register_layer(prefix, layer)
    return layer


def build_minicpm3_attention(vllm_config, hf_config, *, dtype=torch.bfloat16, device="cpu", seed: int = 0):
    """A real ``MiniCPM3Attention`` as ``MiniCPM3DecoderLayer`` builds it, registered under its
    prefix, as the overlay registers it when built."""
    from vllm.model_executor.models.minicpm3 import MiniCPM3Attention

    def make(prefix):
        return MiniCPM3Attention(
            config=hf_config,
            **mla_sizes(hf_config),
            max_position_embeddings=hf_config.max_position_embeddings,
            cache_config=vllm_config.cache_config,
            quant_config=None,
            prefix=prefix,
        )

    prefix = f"minicpm3{next(_layer_ids)}.layers.0.self_attn"
    return _built(vllm_config, make, prefix, dtype=dtype, device=device, seed=seed, register=True)


def build_olmo_hybrid_gdn_layer(vllm_config, hf_config, *, dtype=torch.bfloat16, device="cpu", seed: int = 0):
    """A real ``OlmoHybridGatedDeltaNetAttention`` (its ``__init__`` sets up Triton's allocator:
    on a machine without Triton the caller stands that call in)."""
    from vllm.model_executor.layers.mamba.gdn.olmo_gdn_linear_attn import (
        OlmoHybridGatedDeltaNetAttention,
    )

    def make(prefix):
        return OlmoHybridGatedDeltaNetAttention(hf_config, vllm_config, prefix=prefix)

    prefix = f"olmo{next(_layer_ids)}.layers.0.linear_attn"
    return _built(vllm_config, make, prefix, dtype=dtype, device=device, seed=seed, register=False)


def build_bailing_kda_layer(vllm_config, hf_config, *, dtype=torch.bfloat16, device="cpu", seed: int = 0):
    """A real ``BailingMoeV3KimiDeltaAttention`` as ``BailingMoeV3DecoderLayer`` builds it on a
    KDA layer, findable under its prefix (where vLLM's forward context holds it)."""
    from vllm.model_executor.models.bailing_moe_v3 import BailingMoeV3KimiDeltaAttention

    def make(prefix):
        return BailingMoeV3KimiDeltaAttention(
            hf_config,
            quant_config=None,
            layer_id=0,
            prefix=prefix,
            model_config=vllm_config.model_config,
            cache_config=vllm_config.cache_config,
        )

    prefix = f"bailing{next(_layer_ids)}.layers.0.self_attn"
    return _built(vllm_config, make, prefix, dtype=dtype, device=device, seed=seed, register=True)


def build_kimi_gdn_layer(vllm_config, hf_config, *, dtype=torch.bfloat16, device="cpu", seed: int = 0):
    """A real ``KimiGatedDeltaNetAttention`` as Kimi-Linear's decoder layer builds it, findable
    under its prefix."""
    from vllm.model_executor.layers.mamba.gdn.kimi_gdn_linear_attn import KimiGatedDeltaNetAttention

    def make(prefix):
        return KimiGatedDeltaNetAttention(hf_config, vllm_config, prefix=prefix)

    prefix = f"kimi{next(_layer_ids)}.layers.0.self_attn"
    return _built(vllm_config, make, prefix, dtype=dtype, device=device, seed=seed, register=True)


def build_kimi_mla_layer(vllm_config, hf_config, *, dtype=torch.bfloat16, device="cpu", seed: int = 0):
    """A real Kimi-Linear ``MultiHeadLatentAttention`` (full-rank q: no q_lora_rank) as its
    decoder layer builds it, its projections post-processed as the loader does; not its own
    attention-kernel step (``attention=False``): callers stand in ``_attention``."""
    from vllm.models.kimi_k3.nvidia.mla import MultiHeadLatentAttention

    def make(prefix):
        return MultiHeadLatentAttention(
            hf_config,
            **mla_sizes(hf_config),
            cache_config=vllm_config.cache_config,
            prefix=prefix,
        )

    prefix = f"kimimla{next(_layer_ids)}.layers.1.self_attn"
    return _built(vllm_config, make, prefix, dtype=dtype, device=device, seed=seed, register=False, attention=False)


def mla_sizes(hf_config) -> dict:
    """The size arguments every MLA attention layer (DeepSeek's, MiniCPM3's, Kimi's) takes,
    read from the model's config."""
    return {
        "hidden_size": hf_config.hidden_size,
        "num_heads": hf_config.num_attention_heads,
        "qk_nope_head_dim": hf_config.qk_nope_head_dim,
        "qk_rope_head_dim": hf_config.qk_rope_head_dim,
        "v_head_dim": hf_config.v_head_dim,
        "q_lora_rank": hf_config.q_lora_rank,
        "kv_lora_rank": hf_config.kv_lora_rank,
    }


def cpu_mla_backend(device) -> type | None:
    """The MLA backend to pass on the CPU (None elsewhere: vLLM picks)."""
    if torch.device(device).type != "cpu":
        return None
    from vllm.v1.attention.backends.mla.cpu_mla import CPUMLABackend

    return CPUMLABackend


def scaled_for_tp(hf_config, tp: int, heads: tuple[str, ...]):
    """The per-rank shapes of tensor parallel ``tp`` on one device: ``heads`` divided by tp."""
    cfg = copy.deepcopy(hf_config)
    for name in heads:  # an attribute, or "attribute.key" of a dict attribute
        attr, _, key = name.partition(".")
        value = getattr(cfg, attr)[key] if key else getattr(cfg, attr)
        if value % tp:
            raise ValueError(f"{name}={value} is not divisible by tensor parallel size {tp}")
        if key:
            getattr(cfg, attr)[key] = value // tp
        else:
            setattr(cfg, name, value // tp)
    return cfg


# ---------------------------------------------------------------------------------------------
# Per site: how to build its layer and its entry's arguments
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteLayer:
    """``build(vllm_config, hf_config, dtype, device, seed)`` -> the layer;
    ``inputs(layer, hf_config, tokens, dtype, device, generator)`` -> the entry's arguments,
    the layer first; ``tp_heads``: the config's head counts tensor parallelism divides;
    ``unmeasured``: why the site cannot be timed outside the engine (empty: it can)."""

    build: Callable
    inputs: Callable
    tp_heads: tuple[str, ...]
    unmeasured: str = ""


def _randn(generator, device, dtype, *shape):
    return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)


def _hidden_inputs(layer, hf, tokens, dtype, device, gen):
    """The layer and its hidden states (GDN's in_proj pair, V3.2's A-projection pair)."""
    return layer, _randn(gen, device, dtype, tokens, hf.hidden_size)


def _indexer_inputs(layer, hf, tokens, dtype, device, gen):
    return layer, _randn(gen, device, dtype, tokens, hf.hidden_size), _randn(gen, device, dtype, tokens, hf.q_lora_rank)


def _v32_q_inputs(layer, hf, tokens, dtype, device, gen):
    return layer, _randn(gen, device, dtype, tokens, hf.q_lora_rank), True


def _wrapper_inputs(layer, hf, tokens, dtype, device, gen):
    positions = torch.randint(0, hf.max_position_embeddings, (tokens,), generator=gen).to(device)
    q_c = _randn(gen, device, dtype, tokens, hf.q_lora_rank)
    k_pe = _randn(gen, device, dtype, tokens, 1, hf.qk_rope_head_dim)
    hidden = _randn(gen, device, dtype, tokens, hf.hidden_size)
    return layer, layer.q_b_proj, q_c, positions, k_pe, hidden, q_c


def _v32_layer(vllm_config, hf, dtype, device, seed):
    return build_v32_attention(
        vllm_config, hf, True, dtype=dtype, device=device, seed=seed, attn_backend=cpu_mla_backend(device)
    )


def _gdn_layer(vllm_config, hf, dtype, device, seed):
    return build_gdn_layer(vllm_config, hf, dtype=dtype, device=device, seed=seed)


def _indexer_layer(vllm_config, hf, dtype, device, seed):
    return build_indexer(vllm_config, hf, dtype=dtype, device=device, seed=seed)


def _wrapper_layer(vllm_config, hf, dtype, device, seed):
    return build_mla_wrapper(vllm_config, hf, True, dtype=dtype, device=device, seed=seed)


def _minicpm3_layer(vllm_config, hf, dtype, device, seed):
    return build_minicpm3_attention(vllm_config, hf, dtype=dtype, device=device, seed=seed)


def _olmo_hybrid_layer(vllm_config, hf, dtype, device, seed):
    return build_olmo_hybrid_gdn_layer(vllm_config, hf, dtype=dtype, device=device, seed=seed)


def _bailing_kda_layer(vllm_config, hf, dtype, device, seed):
    return build_bailing_kda_layer(vllm_config, hf, dtype=dtype, device=device, seed=seed)


def _kimi_gdn_layer(vllm_config, hf, dtype, device, seed):
    return build_kimi_gdn_layer(vllm_config, hf, dtype=dtype, device=device, seed=seed)


def _kimi_mla_layer(vllm_config, hf, dtype, device, seed):
    return build_kimi_mla_layer(vllm_config, hf, dtype=dtype, device=device, seed=seed)


def _kimi_mla_inputs(layer, hf, tokens, dtype, device, gen):
    """What _forward_full_rank_q hands the site: the layer, hidden states and its two
    projections (bound to locals there)."""
    return layer, _randn(gen, device, dtype, tokens, hf.hidden_size), layer.q_proj, layer.kv_a_proj_with_mqa


GDN_HEADS = ("linear_num_key_heads", "linear_num_value_heads")
# q_b_proj is column-parallel over the attention heads; the indexer's projections are
# replicated on every rank.
MLA_HEADS = ("num_attention_heads",)

SITE_LAYERS: dict[str, SiteLayer] = {
    "gdn_in_proj": SiteLayer(_gdn_layer, _hidden_inputs, GDN_HEADS),
    "deepseek_indexer_v32": SiteLayer(_v32_layer, _hidden_inputs, MLA_HEADS),
    "mla_q_b_proj_v32": SiteLayer(_v32_layer, _v32_q_inputs, MLA_HEADS),
    "deepseek_indexer_legacy": SiteLayer(_indexer_layer, _indexer_inputs, MLA_HEADS),
    "mla_q_b_proj_legacy": SiteLayer(
        _wrapper_layer,
        _wrapper_inputs,
        MLA_HEADS,
        unmeasured=(
            "its current branch is the whole indexer call, whose top-k kernel reads the "
            "engine's attention metadata: timed end to end only"
        ),
    ),
    # q_b_proj is column-parallel over the heads; q_a_proj and kv_a_proj_with_mqa replicated
    "kv_a_proj_minicpm3": SiteLayer(_minicpm3_layer, _hidden_inputs, MLA_HEADS),
    "delta_in_proj_olmo_hybrid": SiteLayer(_olmo_hybrid_layer, _hidden_inputs, GDN_HEADS),
    # qkvb_proj, f_proj and g_proj are column-parallel over the attention heads
    "delta_in_proj_bailing_moe_v3": SiteLayer(_bailing_kda_layer, _hidden_inputs, MLA_HEADS),
    # in_proj_qkvgfab and g_b_proj are column-parallel over the KDA heads (linear_attn_config)
    "delta_in_proj_kimi_gdn": SiteLayer(_kimi_gdn_layer, _hidden_inputs, ("linear_attn_config.num_heads",)),
    # q_proj is column-parallel over the heads; kv_a_proj_with_mqa replicated
    "kv_a_proj_kimi_linear": SiteLayer(_kimi_mla_layer, _kimi_mla_inputs, MLA_HEADS),
}
