"""vLLM 0.34's own GDN overlap (``_ba_stream`` in forward_cuda): the overlay steps aside, turns
it on for layers whose model did not opt in only where upstream's conditions hold, and the
census counts each layer by the function that runs on this platform, never by its class.

The real QwenGatedDeltaNetAttention of the installed vLLM (0.32, whose forward_cuda the overlay
still rewrites) stands in for 0.34's: forward_cuda is taken as upstream's (not rewritten,
outcome ``upstream``), and the layer dispatches to it, as on a CUDA machine."""

from __future__ import annotations

import types

import pytest
import torch

from vllm_overlap import outcomes
from vllm_overlap.runtime import census as site_census
from vllm_overlap.runtime import gdn_upstream
from vllm_overlap.sites import FEATURES

SITE = FEATURES["gdn_in_proj"].sites[0]
CUDA_TARGET = next(t for t in SITE.targets if t.qualname == "QwenGatedDeltaNetAttention.forward_cuda")


class _Event:
    pass


@pytest.fixture
def as_on_cuda_034(monkeypatch):
    """forward_cuda is upstream's own fork (0.34), and, once the returned ``activate()`` is
    called (after the layers are built on the CPU), this is a CUDA machine whose vLLM config
    allows upstream's path: an unquantized in_proj_ba on plain cuBLAS, no ubatching, no LoRA."""
    import sys

    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    from vllm.platforms import current_platform

    from vllm_overlap.engine import rewrite

    real_applied = rewrite.applied_features
    monkeypatch.setattr(
        rewrite, "applied_features",
        lambda target: () if target == CUDA_TARGET else real_applied(target),
    )
    monkeypatch.setitem(
        outcomes.outcomes,
        (SITE.feature, str(CUDA_TARGET)),
        outcomes.Outcome(SITE.feature, str(CUDA_TARGET), outcomes.UPSTREAM, "vLLM forks in_proj_qkvz beside in_proj_ba itself"),
    )
    config = types.SimpleNamespace(parallel_config=types.SimpleNamespace(use_ubatching=False), lora_config=None)

    def activate(*layers):
        plain = object()
        for layer in layers:  # vLLM's CPU post-processing sets the method's own _gemm_impl
            monkeypatch.setattr(layer.in_proj_ba.quant_method, "_gemm_impl", plain, raising=False)
        monkeypatch.setattr(current_platform, "is_cuda", lambda: True)
        monkeypatch.setattr(sys.modules[CUDA_TARGET.module], "cuda_unquantized_gemm", plain, raising=False)
        monkeypatch.setattr(UnquantizedLinearMethod, "_gemm_impl", plain, raising=False)
        monkeypatch.setattr(gdn_upstream, "_vllm_config", lambda: config)
        monkeypatch.setattr(torch.cuda, "Event", _Event)
        monkeypatch.setattr("vllm_overlap.runtime.streams.get_aux_stream", lambda: "aux")

    config.activate = activate
    return config


def _on_cuda(layer, opted_in=False):
    layer._forward_method = layer.forward_cuda
    layer._ba_stream = "model's own stream" if opted_in else None
    return layer


def _model(*layers, compiled=False):
    model = torch.nn.Module()
    inner = torch.nn.Module()
    if compiled is not None:
        inner.do_not_compile = not compiled  # what vLLM's @support_torch_compile sets
    for i, layer in enumerate(layers):
        inner.add_module(f"l{i}", layer)
    model.add_module("model", inner)
    return model


def _row(model):
    return site_census.site_report(model, SITE)


def test_layers_not_opted_in_get_upstreams_path_turned_on_and_opted_in_ones_are_left(gdn_layer, as_on_cuda_034):
    opted, plain = _on_cuda(gdn_layer(), opted_in=True), _on_cuda(gdn_layer(seed=1))
    as_on_cuda_034.activate(opted, plain)
    row = _row(_model(opted, plain, compiled=False))
    assert (row["layers"], row["overlap"], row["serial"]) == (2, 2, {})
    assert row["upstream"] == {gdn_upstream.NATIVE: 1, gdn_upstream.TURNED_ON: 1}
    assert opted._ba_stream == "model's own stream"  # never touched: one fork of one pair
    assert plain._ba_stream == "aux" and isinstance(plain._ba_events[0], _Event)


@pytest.mark.parametrize(
    "condition, expected",
    [
        ("compiled", "serial: runs under torch.compile"),
        ("ubatching", "serial: ubatching is on"),
        ("lora", "serial: LoRA is on"),
        ("quantised", "serial: in_proj_ba is not an unquantized GEMM on plain cuBLAS"),
        ("not cuda", "serial: upstream's _ba_stream path is CUDA only"),
        ("no aux stream", "serial: no aux stream"),
    ],
)
def test_upstreams_conditions_keep_the_layer_serial(gdn_layer, as_on_cuda_034, monkeypatch, condition, expected):
    layer = _on_cuda(gdn_layer())
    as_on_cuda_034.activate(layer)
    if condition == "ubatching":
        as_on_cuda_034.parallel_config.use_ubatching = True
    elif condition == "lora":
        as_on_cuda_034.lora_config = object()
    elif condition == "quantised":
        monkeypatch.setattr(layer.in_proj_ba, "quant_method", object())
    elif condition == "not cuda":
        from vllm.platforms import current_platform

        monkeypatch.setattr(current_platform, "is_cuda", lambda: False)
    elif condition == "no aux stream":
        monkeypatch.setattr("vllm_overlap.runtime.streams.get_aux_stream", lambda: None)
    row = _row(_model(layer, compiled=condition == "compiled"))
    assert row["overlap"] == 0 and layer._ba_stream is None
    (reason, n), = row["serial"].items()
    assert n == 1 and reason.startswith(expected), reason


def test_a_layer_whose_running_function_is_not_rewritten_never_counts_as_overlapping(gdn_layer, monkeypatch):
    """The 0.34 bug the census had: GDN layers counted by class, overlapping on CUDA although
    forward_cuda was not rewritten. Here forward_cuda is skipped (anchor not found)."""
    from vllm_overlap.engine import rewrite

    real_applied = rewrite.applied_features
    monkeypatch.setattr(rewrite, "applied_features", lambda t: () if t == CUDA_TARGET else real_applied(t))
    monkeypatch.setitem(
        outcomes.outcomes,
        (SITE.feature, str(CUDA_TARGET)),
        outcomes.Outcome(SITE.feature, str(CUDA_TARGET), outcomes.SKIPPED, "anchor not found"),
    )
    on_cpu, on_cuda = gdn_layer(), _on_cuda(gdn_layer(seed=1))
    row = _row(_model(on_cpu, on_cuda))
    assert (row["layers"], row["overlap"]) == (2, 1)
    assert row["serial"] == {"serial: its forward_cuda runs upstream's statements (skipped: anchor not found)": 1}


def test_on_the_cpu_the_rewritten_forward_cpu_is_what_the_census_counts(gdn_layer):
    layer = gdn_layer()
    assert layer._forward_method.__func__.__name__ == "forward_cpu"
    assert site_census.platform_reason(SITE, layer, set()) is None  # the overlay's rewrite runs


def test_the_compiled_set_follows_vllms_do_not_compile():
    compiled, eager = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    assert site_census.compiled_modules(_model(compiled, compiled=True)) >= {id(compiled)}
    assert id(eager) not in site_census.compiled_modules(_model(eager, compiled=False))
    assert id(eager) not in site_census.compiled_modules(_model(eager, compiled=None))


def test_strict_never_stops_because_upstream_took_over(monkeypatch):
    import dataclasses

    from vllm_overlap.config import active as active_config
    from vllm_overlap.config.loader import LoadedConfig, OverlayConfig
    from vllm_overlap.runtime import plugin

    monkeypatch.setattr(active_config, "_loaded", LoadedConfig(OverlayConfig(strict=True), "strict.yaml"))
    upstream = outcomes.Outcome(SITE.feature, str(CUDA_TARGET), outcomes.UPSTREAM, "vLLM forks the pair itself")
    plugin._enforce_strict([upstream])  # upstream doing the site's job is not a failure
    with pytest.raises(plugin.StrictError):
        plugin._enforce_strict([dataclasses.replace(upstream, status=outcomes.SKIPPED, reason="anchor not found")])


def test_a_layer_without_its_dispatch_attribute_is_never_counted_as_overlapping(gdn_layer):
    layer = gdn_layer()
    del layer._forward_method
    overlaps, why = site_census.platform_reason(SITE, layer, set())
    assert not overlaps and "no _forward_method on the layer" in why
