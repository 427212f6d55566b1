"""Time each site's region on its real vLLM layer (``layer_builders``), overlay on vs off.

Used by ``benchmarks/site_regions.py``, ``vllm-overlap calibrate`` and the tests. On a GPU each
region is captured in a CUDA graph and timed with device events over replays; on the CPU it
is timed with ``perf_counter`` (no second stream there: the ratio is the overlay's overhead,
read against the spread of "off" over interleaved rounds).
"""

from __future__ import annotations

import socket
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from vllm_overlap.config import active as active_config
from vllm_overlap.config.loader import LoadedConfig, OverlayConfig

TOKEN_COUNTS = (1, 2, 4, 8, 16, 64, 256, 1024, 4096)


@contextmanager
def standalone_vllm(model: str, dtype: str = "bfloat16", hf_overrides: dict | None = None) -> Iterator:
    """A current VllmConfig for ``model`` (with vLLM's ``hf_overrides``) and a one-rank
    model-parallel group."""
    from vllm.config import ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.distributed.parallel_state import model_parallel_is_initialized

    model_config = ModelConfig(model=model, dtype=dtype, hf_overrides=hf_overrides or {})
    vllm_config = VllmConfig(model_config=model_config)
    with set_current_vllm_config(vllm_config):
        if not torch.distributed.is_initialized():
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            sock.close()
            init_distributed_environment(
                world_size=1,
                rank=0,
                distributed_init_method=f"tcp://127.0.0.1:{port}",
                local_rank=0,
                backend="nccl" if torch.cuda.is_available() else "gloo",
            )
        if not model_parallel_is_initialized():
            initialize_model_parallel(1, 1)
        yield vllm_config


@contextmanager
def overlap_everywhere(feature: str) -> Iterator:
    """Let ``feature`` overlap at every token count while measuring (restored after)."""
    before = active_config.loaded()
    wide = OverlayConfig().model_dump()
    wide["features"][feature].update(min_tokens=0, max_tokens=10**9)
    active_config.set_loaded(LoadedConfig(OverlayConfig.model_validate(wide), "benchmark"))
    try:
        yield
    finally:
        active_config.set_loaded(before)


@contextmanager
def forced_op_path() -> Iterator:
    """Take the overlay's op path even without a second stream (as VLLM_OVERLAP_TEST_OP_PATH=1)."""
    from vllm_overlap.runtime import gates

    before = gates.set_overlap_possible(True)
    try:
        yield
    finally:
        gates.set_overlap_possible(before)


def median_seconds(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    if device.type == "cuda":
        return _cuda_graph_median(fn, reps)
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _cuda_graph_median(fn: Callable[[], object], reps: int) -> float:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def site_runtime(site_id: str):
    """The runtime of ``site_id`` compiled from its first target's upstream function: the
    branches, serial path and op the rewritten code runs (nothing is rewritten)."""
    from vllm_overlap.runtime.module_namespaces import standalone
    from vllm_overlap.sites import SITES

    site = SITES[site_id]
    return standalone(site, site.targets[0])


def bench_site(rt, make_args, token_counts=TOKEN_COUNTS, reps: int = 50, rounds: int = 5) -> list[dict]:
    """Per token count: the site's region overlay off (upstream's statements, serially) and
    on (the site's entry), in interleaved rounds, and each branch alone (every branch of a
    fan-out). ``make_args(n)`` gives the entry's arguments for n tokens, the layer first.

    ``on/off`` is the ratio of the medians over all rounds; ``noise`` is the spread of the
    off timings across rounds ((max - min) / median): the difference the machine makes alone.
    """
    per_round = max(reps // rounds, 3)
    rows = []
    with overlap_everywhere(rt.site.feature), torch.inference_mode():
        for n in token_counts:
            args = make_args(n)
            device = args[rt.tokens_index].device

            def off(args=args):
                return rt.serial(*args)

            def on(args=args):
                return rt(*args)

            alone = [
                median_seconds(lambda fn=fn, args=args: fn(*args), device, reps) for fn in rt.compiled.branches.values()
            ]
            offs, ons, op_paths = [], [], []
            for _ in range(rounds):
                offs.append(median_seconds(off, device, per_round))
                ons.append(median_seconds(on, device, per_round))
                if device.type == "cpu":  # the op path a GPU runs, serially (eager overhead)
                    with forced_op_path():
                        op_paths.append(median_seconds(on, device, per_round))
            t_off, t_on = statistics.median(offs), statistics.median(ons)
            extra = {"op_path/off": statistics.median(op_paths) / t_off} if op_paths else {}
            rows.append(
                {
                    "tokens": n,
                    "off_us": t_off * 1e6,
                    "on_us": t_on * 1e6,
                    "on/off": t_on / t_off,
                    **extra,
                    "noise": (max(offs) - min(offs)) / t_off,
                    "serial_sum_us": sum(alone) * 1e6,
                    "critical_path_us": max(alone) * 1e6,
                    "bound": max(alone) / sum(alone),
                }
            )
    return rows


def _has_module(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package is absent
        return False


def measured_sites(hf_config) -> list[tuple[str, str]]:
    """(site id, "" or why it is not measured) for every site this model's layers run: per
    feature the model uses, its sites whose target module this vLLM has, newest first; only
    the first measurable one is timed (older forms of the same region say so)."""
    from vllm_overlap.engine.architectures import model_reason
    from vllm_overlap.sites import FEATURES
    from vllm_overlap.testing.layer_builders import SITE_LAYERS

    out = []
    for feature in FEATURES.values():
        if model_reason(feature, hf_config) is not None:  # what doctor --model says
            continue
        timed = False
        for site in feature.sites:
            module = site.targets[0].module
            if not _has_module(module):
                out.append((site.id, f"this vLLM has no {module}"))
            elif SITE_LAYERS[site.id].unmeasured:
                out.append((site.id, SITE_LAYERS[site.id].unmeasured))
            elif timed:
                out.append((site.id, f"{feature.name} is timed at a newer site of this vLLM"))
            else:
                out.append((site.id, ""))
                timed = True
    return out


def bench_site_layer(site_id: str, vllm_config, hf_config, token_counts=TOKEN_COUNTS, reps: int = 50,
                     device: str = "cpu", dtype: torch.dtype = torch.bfloat16, rounds: int = 5) -> list[dict]:
    """``bench_site`` on ``site_id``'s real layer built from ``hf_config``."""
    from vllm_overlap.testing.layer_builders import SITE_LAYERS

    spec = SITE_LAYERS[site_id]
    layer = spec.build(vllm_config, hf_config, dtype, device, 0)
    gen = torch.Generator().manual_seed(0)

    def make_args(n):
        return spec.inputs(layer, hf_config, n, dtype, device, gen)

    return bench_site(site_runtime(site_id), make_args, token_counts, reps, rounds)


def measure_model(
    model: str, tp: int = 1, token_counts=TOKEN_COUNTS, reps: int = 50, device: str = "cpu",
    hf_overrides: dict | None = None,
) -> tuple[dict[str, list[dict] | str], str]:
    """Every site ``model`` runs, at its per-rank TP shapes: site id -> rows, or the reason it
    was not measured; and where it ran."""
    from vllm_overlap.testing.layer_builders import SITE_LAYERS, scaled_for_tp

    results: dict[str, list[dict] | str] = {}
    with standalone_vllm(model, hf_overrides=hf_overrides) as vllm_config:
        hf = vllm_config.model_config.hf_text_config
        for site_id, why_not in measured_sites(hf):
            if why_not:
                results[site_id] = why_not
                continue
            scaled = scaled_for_tp(hf, tp, SITE_LAYERS[site_id].tp_heads)
            results[site_id] = bench_site_layer(site_id, vllm_config, scaled, token_counts, reps, device)
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU (serial path)"
    return results, where
