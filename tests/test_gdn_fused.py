"""gdn_in_proj mode fused: one GEMM over concatenated weights, made once after loading."""

from __future__ import annotations

import pytest
import torch
from conftest import GDN_MODULE

from vllm_overlap.runtime import gdn_fuse, streams
from vllm_overlap.sites import FEATURES

GDN = (FEATURES["gdn_in_proj"],)  # what the plugin passes the feature's post-load step


def fused_in_proj(layer, hidden):
    """What the forwards call in mode fused, made from the site's runtime as the plugin does."""
    from conftest import site_runtime

    return gdn_fuse.fused_in_proj(site_runtime("gdn_in_proj", GDN_MODULE))(layer, hidden)


@pytest.fixture
def fused_twin(vllm_context, overlay_applied):
    """(unfused layer, fused layer, fuse report): two layers with the same weights, taken
    through loading as vLLM takes a model in mode fused: the overlay's post-load step (on
    one of them), then vLLM's own weight post-processing (on both), which picks this
    machine's GEMM path for whatever projections each layer then has. ``process=False``
    stops before that last step, where the fusing has happened and nothing is repacked."""
    from vllm_overlap.testing.layer_builders import build_gdn_layer, process_weights_like_the_loader
    from vllm_overlap.testing.tiny_models import qwen3_next_config

    def make(interleaved=True, process=True):
        plain, fused = (
            build_gdn_layer(
                vllm_context,
                qwen3_next_config(2),
                interleaved=interleaved,
                seed=3,
                process_weights=False,
            )
            for _ in range(2)
        )
        report = gdn_fuse.fuse_model(fused, GDN)
        for layer in (plain, fused) if process else ():
            process_weights_like_the_loader(layer, vllm_context)
        return plain, fused, report

    return make


@pytest.mark.parametrize("num_tokens", [1, 7, 256])
@pytest.mark.parametrize("interleaved", [True, False], ids=["qwen3-next", "qwen3.5"])
def test_fused_projection_equals_the_two_projections(fused_twin, num_tokens, interleaved):
    plain, fused, report = fused_twin(interleaved)
    assert report["fused"] == report["layers"] == 1
    hidden = torch.randn(num_tokens, plain.hidden_size, dtype=torch.bfloat16)
    qkvz, ba = fused_in_proj(fused, hidden)
    assert torch.equal(qkvz, plain.in_proj_qkvz(hidden)[0])
    assert torch.equal(ba, plain.in_proj_ba(hidden)[0])
    assert qkvz.is_contiguous() and ba.is_contiguous()


def test_fusing_keeps_no_extra_parameter_memory(fused_twin):
    """Measured where the fusing happens: after loading, before vLLM's post-processing
    (which may repack or drop weights by machine, for fused and plain layers alike)."""
    plain, fused, report = fused_twin(process=False)
    bytes_of = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731
    projections = plain.in_proj_qkvz, plain.in_proj_ba
    expected = sum(p.weight.numel() * p.weight.element_size() for p in projections)
    assert report["bytes_before"] == report["bytes_after"] == expected > 0
    assert bytes_of(fused) == bytes_of(plain)
    assert not hasattr(fused, "in_proj_qkvz") and not hasattr(fused, "in_proj_ba")


@pytest.mark.parametrize(
    "spoil, reason",
    [
        (lambda layer: setattr(layer.in_proj_ba, "base_layer", torch.nn.Identity()), "in_proj_ba is LoRA-wrapped"),
        (lambda layer: setattr(layer.in_proj_qkvz, "quant_method", object()), "in_proj_qkvz is quantised (object)"),
        (lambda layer: setattr(layer.in_proj_ba, "tp_size", 2), "sharded differently"),
        (lambda layer: layer.in_proj_ba.to(torch.float32), "dtypes differ"),
    ],
    ids=["lora", "quantised", "sharding", "dtype"],
)
def test_ineligible_layers_say_why(gdn_layer, spoil, reason):
    layer = gdn_layer()
    assert gdn_fuse.why_not_fusable(layer) is None
    spoil(layer)
    assert reason in gdn_fuse.why_not_fusable(layer)


@pytest.mark.parametrize("fallback, forks", [("serial", 0), ("dual_stream", 1)])
def test_unfused_layer_runs_the_configured_fallback(gdn_layer, monkeypatch, fallback, forks):
    from vllm_overlap.config import active as active_config
    from vllm_overlap.config.loader import LoadedConfig, parse_config

    cfg = parse_config(f"features: {{gdn_in_proj: {{mode: fused, fused_fallback: {fallback}}}}}", "x")
    monkeypatch.setattr(active_config, "loaded", lambda: LoadedConfig(cfg, "test"))
    calls = []
    real = streams.run_pair
    monkeypatch.setattr(streams, "run_pair", lambda *a: calls.append(a[0]) or real(*a))
    layer = gdn_layer()
    hidden = torch.randn(3, layer.hidden_size, dtype=torch.bfloat16)
    qkvz, ba = fused_in_proj(layer, hidden)
    assert len(calls) == forks
    assert torch.equal(qkvz, layer.in_proj_qkvz(hidden)[0]) and torch.equal(ba, layer.in_proj_ba(hidden)[0])


def test_a_layer_the_post_load_step_never_saw_says_so_and_runs_the_fallback(
    gdn_layer, vllm_context, monkeypatch, caplog
):
    """A loader that skips vLLM's post-processing (so the fusing step never ran): the layer
    runs the configured fallback, and a warning names it once; a layer the step looked at and
    could not fuse runs it silently (the step's own line said why)."""
    from vllm_overlap.config import active as active_config
    from vllm_overlap.config.loader import LoadedConfig, parse_config
    from vllm_overlap.testing.layer_builders import process_weights_like_the_loader

    cfg = parse_config("features: {gdn_in_proj: {mode: fused, fused_fallback: serial}}", "x")
    monkeypatch.setattr(active_config, "loaded", lambda: LoadedConfig(cfg, "test"))
    monkeypatch.setattr(gdn_fuse, "_warned", set())
    never_seen = gdn_layer()
    # A checkpoint whose in_proj_ba has a (zero) bias: not fusable, same results. Loaded as the
    # loader takes it: the fusing step, then vLLM's post-processing, which puts the bias in the
    # dtype this machine's GEMM path takes (some CPU paths take only an fp32 bias).
    seen = gdn_layer(seed=1, process_weights=False)
    seen.prefix = "model.layers.1.linear_attn"
    width = seen.in_proj_ba.output_size_per_partition
    seen.in_proj_ba.bias = torch.nn.Parameter(torch.zeros(width, dtype=torch.bfloat16), requires_grad=False)
    gdn_fuse.fuse_model(seen, GDN)
    process_weights_like_the_loader(seen, vllm_context)
    hidden = torch.randn(3, never_seen.hidden_size, dtype=torch.bfloat16)
    with caplog.at_level("WARNING"):
        for layer in (never_seen, never_seen, seen):
            qkvz, ba = fused_in_proj(layer, hidden)
            assert torch.equal(qkvz, layer.in_proj_qkvz(hidden)[0])
            assert torch.equal(ba, layer.in_proj_ba(hidden)[0])
    warnings = [r.getMessage() for r in caplog.records if "was never fused" in r.getMessage()]
    assert warnings == [
        f"vllm-overlap gdn_in_proj fused: layer {never_seen.prefix} was never fused (the "
        "post-load step did not run for its model); it runs serial"
    ]
