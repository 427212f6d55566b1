"""Real model shapes of every overlap site: the one table the benchmarks read.

``MODELS`` holds the published ``config.json`` values that decide a site's GEMM shapes (from
each model's Hugging Face repository, named in ``source``). ``SITES`` says, per site, what each
branch computes from those values, as vLLM builds it: which input it reads, and each GEMM's
input and output width, sharded by tensor parallelism (ColumnParallel / MergedColumnParallel:
output width divided by tp) or replicated (ReplicatedLinear: the same on every rank).
``site_shapes`` turns one (site, model, tp) into per-rank shapes. Plain Python: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Values copied from each repository's config.json (text_config for the Qwen3.5 models).
MODELS: dict[str, dict] = {
    "Qwen3-Next-80B-A3B": dict(
        source="Qwen/Qwen3-Next-80B-A3B-Instruct",
        family="gdn",
        hidden_size=2048,
        linear_num_key_heads=16,
        linear_key_head_dim=128,
        linear_num_value_heads=32,
        linear_value_head_dim=128,
    ),
    "Qwen3.5-35B-A3B": dict(
        source="Qwen/Qwen3.5-35B-A3B",
        family="gdn",
        hidden_size=2048,
        linear_num_key_heads=16,
        linear_key_head_dim=128,
        linear_num_value_heads=32,
        linear_value_head_dim=128,
    ),
    "Qwen3.5-122B-A10B": dict(
        source="Qwen/Qwen3.5-122B-A10B",
        family="gdn",
        hidden_size=3072,
        linear_num_key_heads=16,
        linear_key_head_dim=128,
        linear_num_value_heads=64,
        linear_value_head_dim=128,
    ),
    "Qwen3.5-397B-A17B": dict(
        source="Qwen/Qwen3.5-397B-A17B",
        family="gdn",
        hidden_size=4096,
        linear_num_key_heads=16,
        linear_key_head_dim=128,
        linear_num_value_heads=64,
        linear_value_head_dim=128,
    ),
    "DeepSeek-V3.2": dict(
        source="deepseek-ai/DeepSeek-V3.2",
        family="dsa",
        hidden_size=7168,
        num_attention_heads=128,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        index_n_heads=64,
        index_head_dim=128,
    ),
    "GLM-5": dict(
        source="zai-org/GLM-5",
        family="dsa",
        hidden_size=6144,
        num_attention_heads=64,
        q_lora_rank=2048,
        kv_lora_rank=512,
        qk_nope_head_dim=192,
        qk_rope_head_dim=64,
        index_n_heads=32,
        index_head_dim=128,
    ),
    "MiniCPM3-4B": dict(
        # transformers' MiniCPM3Config defaults, which its docstring gives as this checkpoint's
        source="openbmb/MiniCPM3-4B",
        family="minicpm3",
        hidden_size=2560,
        num_attention_heads=40,
        q_lora_rank=768,
        kv_lora_rank=256,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
    ),
    "OLMo-Hybrid-7B": dict(
        # transformers' OlmoHybridConfig defaults, which its docstring gives as this checkpoint's
        source="allenai/Olmo-Hybrid-7B",
        family="olmo_hybrid",
        hidden_size=3840,
        linear_num_key_heads=30,
        linear_key_head_dim=96,
        linear_num_value_heads=30,
        linear_value_head_dim=192,
    ),
    "Ling-3.0-flash": dict(
        # BailingMoeV3ForCausalLM (model_type bailing_hybrid), config.json as quoted by two
        # independent third-party copies: hidden 2560, 32 heads of 128, 42 layers
        source="inclusionAI/Ling-3.0-flash",
        family="bailing_moe_v3",
        hidden_size=2560,
        num_attention_heads=32,
        head_dim=128,
    ),
    "Kimi-Linear-48B-A3B": dict(
        # config.json of the checkpoint as quoted by two independent third-party copies (its
        # hidden_size, heads, MLA ranks and linear_attn_config); no q_lora_rank
        source="moonshotai/Kimi-Linear-48B-A3B-Instruct",
        family="kimi_linear",
        hidden_size=2304,
        num_attention_heads=32,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        kda_num_heads=32,
        kda_head_dim=128,
    ),
}
TP_SIZES = (1, 2, 4, 8)
TOKEN_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


@dataclass(frozen=True)
class Gemm:
    """``y = x @ W.T`` on the previous op's output, or on the branch's input (the first op, or
    ``from_input``): [tokens, k] -> [tokens, n] (n per rank)."""

    name: str
    k: int
    n: int
    from_input: bool = False


@dataclass(frozen=True)
class Bmm:
    """MLA's absorbed ``W_UK_T``: the previous GEMM's output viewed as [tokens, heads, width]
    (its first ``k`` columns per head), ``bmm`` by [heads, k, n]: [heads, tokens, n]."""

    name: str
    heads: int
    width: int
    k: int
    n: int


@dataclass(frozen=True)
class LayerNorm:
    """The indexer's ``k_norm``: LayerNorm over the first ``width`` columns of the previous
    GEMM's output."""

    name: str
    width: int


@dataclass(frozen=True)
class RMSNorm:
    """An RMSNorm over the previous GEMM's whole output (``width`` columns)."""

    name: str
    width: int


@dataclass(frozen=True)
class Branch:
    input: str  # "hidden" [tokens, hidden_size] or "q_c" [tokens, q_lora_rank]
    input_width: int
    ops: tuple


@dataclass(frozen=True)
class PairShapes:
    """One site at one model and tensor-parallel size, per rank."""

    site: str
    model: str
    tp: int
    branch0: Branch  # the current stream
    branch1: Branch  # the aux stream
    fused: bool  # the site has a fused form: one GEMM over both branches' weights
    notes: tuple[str, ...] = field(default=())
    more: tuple[Branch, ...] = field(default=())  # a fan-out's further aux branches, a stream each

    @property
    def branches(self) -> tuple[Branch, ...]:
        return (self.branch0, self.branch1, *self.more)


def _shard(width: int, tp: int, what: str) -> int:
    if width % tp:
        raise ValueError(f"{what}={width} is not divisible by tensor parallel size {tp}")
    return width // tp


def _gdn_in_proj(c: dict, tp: int) -> tuple[Branch, Branch, bool, tuple]:
    # QwenGatedDeltaNetAttention: in_proj_qkvz = MergedColumnParallelLinear(hidden,
    # [key_dim, key_dim, value_dim, value_dim]); in_proj_ba = MergedColumnParallelLinear(
    # hidden, [num_v_heads, num_v_heads]). Both sharded by tp.
    h = c["hidden_size"]
    key_dim = c["linear_num_key_heads"] * c["linear_key_head_dim"]
    value_dim = c["linear_num_value_heads"] * c["linear_value_head_dim"]
    _shard(c["linear_num_key_heads"], tp, "linear_num_key_heads")
    qkvz = _shard(2 * key_dim + 2 * value_dim, tp, "qkvz width")
    ba = _shard(2 * c["linear_num_value_heads"], tp, "ba width")
    return (
        Branch("hidden", h, (Gemm("in_proj_qkvz", h, qkvz),)),
        Branch("hidden", h, (Gemm("in_proj_ba", h, ba),)),
        True,
        (),
    )


def _deepseek_indexer(c: dict, tp: int) -> tuple[Branch, Branch, bool, tuple]:
    # DeepseekV32Attention.forward: fused_qkv_a_proj (MergedReplicatedLinear, hidden ->
    # q_lora + kv_lora + rope) beside indexer.wk_weights_proj (ReplicatedLinear, hidden ->
    # index_head_dim + index_n_heads). Replicated: the same on every rank.
    h = c["hidden_size"]
    a_proj = c["q_lora_rank"] + c["kv_lora_rank"] + c["qk_rope_head_dim"]
    kw = c["index_head_dim"] + c["index_n_heads"]
    return (
        Branch("hidden", h, (Gemm("fused_qkv_a_proj", h, a_proj),)),
        Branch("hidden", h, (Gemm("indexer.wk_weights_proj", h, kw),)),
        False,
        ("replicated: the same shapes at every tp",),
    )


def _deepseek_indexer_legacy(c: dict, tp: int) -> tuple[Branch, Branch, bool, tuple]:
    # Legacy Indexer.forward (the path vLLM <= 0.31 runs for V3.2): wq_b(qr) (ReplicatedLinear,
    # q_lora -> index_n_heads * index_head_dim) beside wk_weights_proj(h) + k_norm.
    h, q = c["hidden_size"], c["q_lora_rank"]
    wq_b = c["index_n_heads"] * c["index_head_dim"]
    kw = c["index_head_dim"] + c["index_n_heads"]
    return (
        Branch("q_c", q, (Gemm("indexer.wq_b", q, wq_b),)),
        Branch(
            "hidden",
            h,
            (Gemm("indexer.wk_weights_proj", h, kw), LayerNorm("indexer.k_norm", c["index_head_dim"])),
        ),
        False,
        ("replicated: the same shapes at every tp",),
    )


def _mla_q_b_proj(c: dict, tp: int) -> tuple[Branch, Branch, bool, tuple]:
    # DeepseekV32Attention.forward: the indexer's wq_b(q_c) (replicated) beside q_b_proj(q_c)
    # (ColumnParallelLinear, q_lora -> heads * (nope + rope), sharded) and the W_UK_T bmm
    # over the heads of this rank.
    q = c["q_lora_rank"]
    heads = _shard(c["num_attention_heads"], tp, "num_attention_heads")
    head_width = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    wq_b = c["index_n_heads"] * c["index_head_dim"]
    return (
        Branch("q_c", q, (Gemm("indexer.wq_b", q, wq_b),)),
        Branch(
            "q_c",
            q,
            (
                Gemm("q_b_proj", q, heads * head_width),
                Bmm("W_UK_T", heads, head_width, c["qk_nope_head_dim"], c["kv_lora_rank"]),
            ),
        ),
        False,
        (),
    )


def _kv_a_proj_minicpm3(c: dict, tp: int) -> tuple[Branch, Branch, bool, tuple]:
    # MiniCPM3Attention.forward: q_a_proj (ReplicatedLinear, hidden -> q_lora), q_a_layernorm,
    # q_b_proj (ColumnParallelLinear, q_lora -> heads * (nope + rope), sharded) beside
    # kv_a_proj_with_mqa (ReplicatedLinear, hidden -> kv_lora + rope).
    h, q = c["hidden_size"], c["q_lora_rank"]
    heads = _shard(c["num_attention_heads"], tp, "num_attention_heads")
    head_width = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    return (
        Branch(
            "hidden",
            h,
            (Gemm("q_a_proj", h, q), RMSNorm("q_a_layernorm", q), Gemm("q_b_proj", q, heads * head_width)),
        ),
        Branch("hidden", h, (Gemm("kv_a_proj_with_mqa", h, c["kv_lora_rank"] + c["qk_rope_head_dim"]),)),
        False,
        (),
    )


def _delta_in_proj_olmo_hybrid(c: dict, tp: int) -> tuple[Branch, Branch, bool, tuple]:
    # OlmoHybridGatedDeltaNetAttention._full_forward: in_proj_qkvg (MergedColumnParallelLinear,
    # hidden -> [key, key, value, value]) beside b_proj then a_proj (ColumnParallelLinear,
    # hidden -> num_value_heads each). All sharded by tp.
    h = c["hidden_size"]
    key_dim = c["linear_num_key_heads"] * c["linear_key_head_dim"]
    value_dim = c["linear_num_value_heads"] * c["linear_value_head_dim"]
    heads = _shard(c["linear_num_value_heads"], tp, "linear_num_value_heads")
    return (
        Branch("hidden", h, (Gemm("in_proj_qkvg", h, _shard(2 * key_dim + 2 * value_dim, tp, "qkvg width")),)),
        Branch("hidden", h, (Gemm("b_proj", h, heads), Gemm("a_proj", h, heads, from_input=True))),
        False,
        ("b_proj and a_proj each read the layer's input",),
    )


def _delta_in_proj_bailing_moe_v3(c: dict, tp: int) -> tuple:
    # BailingMoeV3KimiDeltaAttention.forward: qkvb_proj (MergedColumnParallelLinear, hidden ->
    # [q, k, v (heads * head_dim each), beta (heads)]) beside f_proj and g_proj
    # (ColumnParallelLinear, hidden -> heads * head_dim each), each on an aux stream of its own.
    # All sharded by tp.
    h = c["hidden_size"]
    heads = _shard(c["num_attention_heads"], tp, "num_attention_heads")
    width = heads * c["head_dim"]
    return (
        Branch("hidden", h, (Gemm("qkvb_proj", h, 3 * width + heads),)),
        Branch("hidden", h, (Gemm("f_proj", h, width),)),
        False,
        ("a fan-out: f_proj and g_proj on two aux streams",),
        (Branch("hidden", h, (Gemm("g_proj", h, width),)),),
    )


def _delta_in_proj_kimi_gdn(c: dict, tp: int) -> tuple:
    # KimiGatedDeltaNetAttention.forward (low-rank gate): in_proj_qkvgfab (q, k, v and beta
    # sharded by tp, f_a = head_dim replicated) beside g_a_proj (ReplicatedLinear, hidden ->
    # head_dim) then g_b_proj (ColumnParallelLinear, head_dim -> heads * head_dim, sharded).
    h, d = c["hidden_size"], c["kda_head_dim"]
    heads = _shard(c["kda_num_heads"], tp, "kda_num_heads")
    return (
        Branch("hidden", h, (Gemm("in_proj_qkvgfab", h, 3 * heads * d + heads + d),)),
        Branch("hidden", h, (Gemm("g_a_proj", h, d), Gemm("g_b_proj", d, heads * d))),
        False,
        (),
    )


def _kv_a_proj_kimi_linear(c: dict, tp: int) -> tuple:
    # MultiHeadLatentAttention._forward_full_rank_q: q_proj (ColumnParallelLinear, hidden ->
    # heads * (nope + rope), sharded) beside kv_a_proj_with_mqa (ReplicatedLinear, hidden ->
    # kv_lora + rope).
    h = c["hidden_size"]
    heads = _shard(c["num_attention_heads"], tp, "num_attention_heads")
    return (
        Branch("hidden", h, (Gemm("q_proj", h, heads * (c["qk_nope_head_dim"] + c["qk_rope_head_dim"])),)),
        Branch("hidden", h, (Gemm("kv_a_proj_with_mqa", h, c["kv_lora_rank"] + c["qk_rope_head_dim"]),)),
        False,
        (),
    )


# site -> (model family, what each branch computes: branch0, branch1, fused, notes[, more])
SITES = {
    "gdn_in_proj": ("gdn", _gdn_in_proj),
    "deepseek_indexer": ("dsa", _deepseek_indexer),
    "deepseek_indexer_legacy": ("dsa", _deepseek_indexer_legacy),
    "mla_q_b_proj": ("dsa", _mla_q_b_proj),
    "kv_a_proj_minicpm3": ("minicpm3", _kv_a_proj_minicpm3),
    "delta_in_proj_olmo_hybrid": ("olmo_hybrid", _delta_in_proj_olmo_hybrid),
    "delta_in_proj_bailing_moe_v3": ("bailing_moe_v3", _delta_in_proj_bailing_moe_v3),
    "delta_in_proj_kimi_gdn": ("kimi_linear", _delta_in_proj_kimi_gdn),
    "kv_a_proj_kimi_linear": ("kimi_linear", _kv_a_proj_kimi_linear),
}


def models_for(site: str) -> list[str]:
    family = SITES[site][0]
    return [name for name, c in MODELS.items() if c["family"] == family]


def site_shapes(site: str, model: str, tp: int) -> PairShapes:
    family, build = SITES[site]
    config = MODELS[model]
    if config["family"] != family:
        raise ValueError(f"{model} has no {site} site")
    return PairShapes(site, model, tp, *build(config, tp))


def replicated(shapes: PairShapes) -> bool:
    """Whether tp changes nothing in this site (measure it once)."""
    return "replicated: the same shapes at every tp" in shapes.notes
