"""Build a feature's real vLLM layer outside the engine and time its region, overlay on vs off.

Used by ``benchmarks/layers.py``, ``vllm-overlap calibrate`` and the tests. On a GPU each
region is captured in a CUDA graph and timed with device events over replays; on the CPU it
is timed with ``perf_counter`` (no second stream there: the ratio is the overlay's overhead,
read against the spread of "off" over interleaved rounds).
"""

from __future__ import annotations

import itertools
import socket
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from . import active_config
from .config import LoadedConfig, OverlayConfig

TOKEN_COUNTS = (1, 2, 4, 8, 16, 64, 256, 1024, 4096)
_layer_ids = itertools.count()  # vLLM refuses two layers of one name in a config


@contextmanager
def standalone_vllm(model: str, dtype: str = "bfloat16") -> Iterator:
    """A current VllmConfig for ``model`` and a one-rank model-parallel group."""
    from vllm.config import ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.distributed.parallel_state import model_parallel_is_initialized

    vllm_config = VllmConfig(model_config=ModelConfig(model=model, dtype=dtype))
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


def process_weights_like_the_loader(module: torch.nn.Module, vllm_config) -> None:
    """What vLLM's loader runs on a model after loading its weights, run on ``module``: vLLM's
    own ``process_weights_after_loading`` (quant methods, then deferred attention layers).

    This is where vLLM picks a platform's GEMM path (on the CPU: by ISA and vendor, packing
    or dropping ``weight``), so a layer built by hand runs what a loaded model runs only
    after it, whichever machine this is. The layer goes in as the one child of a plain
    container, as it sits inside a model: the loader's model-level hook is for models."""
    from vllm.model_executor.model_loader.utils import process_weights_after_loading

    device = next(module.parameters()).device
    model = torch.nn.ModuleDict({"layer": module})
    process_weights_after_loading(model, vllm_config.model_config, device)


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

    from .runtime.layers import register_layer

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
    from .runtime import gates

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
    from .patches import SITES
    from .runtime.installed import standalone

    site = SITES[site_id]
    return standalone(site, site.targets[0])


def bench_site(rt, make_args, token_counts=TOKEN_COUNTS, reps: int = 50, rounds: int = 5) -> list[dict]:
    """Per token count: the site's region overlay off (upstream's statements, serially) and
    on (the site's entry), in interleaved rounds, and each branch alone. ``make_args(n)`` gives
    the entry's arguments for n tokens, the layer first.

    ``on/off`` is the ratio of the medians over all rounds; ``noise`` is the spread of the
    off timings across rounds ((max - min) / median): the difference the machine makes alone.
    """
    per_round = max(reps // rounds, 3)
    rows = []
    with overlap_everywhere(rt.site.feature), torch.inference_mode():
        for n in token_counts:
            args = make_args(n)
            device = args[rt.tokens_index].device

            def off():
                return rt.serial(*args)

            def on():
                return rt(*args)

            t_current = median_seconds(lambda: rt.compiled.current(*args), device, reps)
            t_aux = median_seconds(lambda: rt.compiled.aux(*args), device, reps)
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
                    "serial_sum_us": (t_current + t_aux) * 1e6,
                    "critical_path_us": max(t_current, t_aux) * 1e6,
                    "bound": max(t_current, t_aux) / (t_current + t_aux),
                }
            )
    return rows


def bench_gdn_in_proj(layer, token_counts=TOKEN_COUNTS, reps: int = 50, rounds: int = 5) -> list[dict]:
    """``bench_site`` for the gdn_in_proj site on ``layer``."""
    device = next(layer.parameters()).device
    dtype = next(layer.parameters()).dtype

    def make_args(n):
        return layer, torch.randn(n, layer.hidden_size, dtype=dtype, device=device)

    return bench_site(site_runtime("gdn_in_proj"), make_args, token_counts, reps, rounds)


def scaled_for_tp(hf_config, tp: int):
    """The per-rank GDN shapes of tensor parallel ``tp``, on one device: heads divided by tp."""
    import copy

    cfg = copy.deepcopy(hf_config)
    for name in ("linear_num_key_heads", "linear_num_value_heads"):
        value = getattr(cfg, name)
        if value % tp:
            raise ValueError(f"{name}={value} is not divisible by tensor parallel size {tp}")
        setattr(cfg, name, value // tp)
    return cfg


def measure_gdn_in_proj(
    model: str, tp: int = 1, token_counts=TOKEN_COUNTS, reps: int = 50, device: str = "cpu"
) -> tuple[list[dict], str]:
    """Build ``model``'s GDN layer at its per-rank TP shapes and benchmark its region."""
    with standalone_vllm(model) as vllm_config:
        hf = scaled_for_tp(vllm_config.model_config.hf_text_config, tp)
        layer = build_gdn_layer(vllm_config, hf, dtype=torch.bfloat16, device=device)
        rows = bench_gdn_in_proj(layer, token_counts, reps)
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU (serial path)"
    return rows, where
