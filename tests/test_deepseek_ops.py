"""torch.ops.vllm_overlap.deepseek_indexer: opcheck and an exact fake kernel.

The op is the legacy ``Indexer.forward``'s q projection beside its k/w projection + k_norm;
the layer goes in as vLLM's ``LayerName`` (resolved from the overlay's registry: the Indexer
is not an attention layer, so the forward context does not hold it).
"""

from __future__ import annotations


import pytest
import torch

from deepseek_layers import (
    DeepseekStandins,
    build_indexer,
    deepseek_v32_config,
    identical,
    make_inputs,
)
from vllm_overlap.runtime.layers import encode_layer_name, per_rank_width as out_width

TOKEN_COUNTS = [0, 1, 7, 256, 1025]
DTYPES = [torch.bfloat16, torch.float32]
DTYPE_IDS = ["bf16", "fp32"]


@pytest.fixture
def indexer(deepseek_vllm, deepseek_overlay, monkeypatch):
    """Factory of real, registered Indexers (their stand-ins are not needed by the op)."""

    def make(dtype=torch.bfloat16, seed=1):
        standins = DeepseekStandins()
        standins.install(monkeypatch)
        return build_indexer(
            deepseek_vllm, deepseek_v32_config(), standins=standins, dtype=dtype, seed=seed
        )

    return make


def _args(indexer, num_tokens, dtype):
    hf = deepseek_v32_config()
    _, hidden, qr = make_inputs(hf, num_tokens, seed=3, dtype=dtype)
    return (
        hidden,
        qr,
        out_width(indexer.wq_b),
        out_width(indexer.wk_weights_proj),
        indexer.head_dim,
        encode_layer_name(indexer.prefix),
    )


def test_widths_are_the_per_rank_output_sizes(indexer):
    """q: n_head * head_dim; kw: head_dim + n_head (the fused wk + weights_proj); k: head_dim."""
    layer = indexer()
    hidden, qr, q_width, kw_width, k_width, _ = _args(layer, 3, torch.bfloat16)
    hf = deepseek_v32_config()
    assert q_width == hf.index_n_heads * hf.index_head_dim == 512
    assert kw_width == hf.index_head_dim + hf.index_n_heads == 132
    assert k_width == hf.index_head_dim == 128


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("num_tokens", TOKEN_COUNTS)
def test_opcheck(indexer, num_tokens, dtype):
    layer = indexer(dtype=dtype)
    torch.library.opcheck(
        torch.ops.vllm_overlap.deepseek_indexer.default, _args(layer, num_tokens, dtype)
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("num_tokens", TOKEN_COUNTS)
def test_fake_kernel_matches_real_outputs(indexer, num_tokens, dtype):
    """Shapes, dtypes and strides of the fake kernel equal those of the real op, and the real
    outputs are exactly what the replaced upstream statements compute."""
    from torch._subclasses.fake_tensor import FakeTensorMode


    layer = indexer(dtype=dtype)
    args = _args(layer, num_tokens, dtype)
    with torch.no_grad():
        real = torch.ops.vllm_overlap.deepseek_indexer(*args)
        kw = layer.wk_weights_proj(args[0])[0]  # what the three outputs mean
        expected = (layer.wq_b(args[1])[0], kw, layer.k_norm(kw[:, : layer.head_dim]))
    with FakeTensorMode() as mode:
        fake_hidden, fake_qr = mode.from_tensor(args[0]), mode.from_tensor(args[1])
        fake = torch.ops.vllm_overlap.deepseek_indexer(fake_hidden, fake_qr, *args[2:])
    assert len(real) == len(fake) == 3
    for r, f in zip(real, fake):
        assert (tuple(f.shape), f.dtype, f.stride()) == (tuple(r.shape), r.dtype, r.stride())
    assert [tuple(r.shape) for r in real] == [
        (num_tokens, args[2]),
        (num_tokens, args[3]),
        (num_tokens, args[4]),
    ]
    assert [r.dtype for r in real] == [dtype] * 3
    assert all(r.is_contiguous() for r in real)
    # upstream's k is a column slice of kw through k_norm; the op returns it contiguous
    assert identical(tuple(real), tuple(t.contiguous() for t in expected))


def test_fake_kernel_with_a_symbolic_token_count(indexer):
    """Under dynamic shapes the fake outputs keep the token count symbolic."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    layer = indexer()
    args = _args(layer, 9, torch.bfloat16)
    with FakeTensorMode(shape_env=ShapeEnv()) as mode:
        from torch._dynamo.source import ConstantSource
        from torch.fx.experimental.symbolic_shapes import DimDynamic, StatelessSymbolicContext

        ctx = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC, DimDynamic.STATIC])
        hidden = mode.from_tensor(args[0], symbolic_context=ctx, source=ConstantSource("h"))
        tokens = hidden.shape[0]
        assert isinstance(tokens, torch.SymInt)
        qr = mode.from_tensor(args[1]).new_empty((tokens, args[1].shape[1]))
        q, kw, k = torch.ops.vllm_overlap.deepseek_indexer(hidden, qr, *args[2:])
    for out, width in ((q, args[2]), (kw, args[3]), (k, args[4])):
        assert out.shape[0] is tokens or str(out.shape[0]) == str(tokens)
        assert out.shape[1] == width and out.stride() == (width, 1)


@pytest.mark.parametrize("which", [2, 3, 4])
def test_real_op_refuses_an_output_the_fake_did_not_promise(indexer, which):
    layer = indexer()
    args = list(_args(layer, 3, torch.bfloat16))
    args[which] += 1
    with pytest.raises(RuntimeError, match="fake kernel promised"):
        torch.ops.vllm_overlap.deepseek_indexer(*args)


def test_unknown_layer_name_is_a_clear_error(indexer):
    layer = indexer()
    args = list(_args(layer, 2, torch.bfloat16))
    args[5] = encode_layer_name(layer.prefix + ".nope")
    with pytest.raises(KeyError, match="no layer named"):
        torch.ops.vllm_overlap.deepseek_indexer(*args)
