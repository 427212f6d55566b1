"""Host time the rewritten code adds per layer call, against upstream's statements, per site.

    python benchmarks/host_overhead.py                 # every site this CPU can build, 5000 calls
    python benchmarks/host_overhead.py --smoke         # CI: two sites, a few calls
    python benchmarks/host_overhead.py --sites gdn_in_proj --calls 20000

Each site's real vLLM layer (``vllm_overlap.testing.layer_builders``) at tiny shapes and one
token, so the GEMMs cost little and the host time is what shows. "off" is upstream's
statements: the site's branches (compiled from upstream's matched lines) called in upstream's
order; "on" is what the rewritten code calls instead, on the paths a step can take outside a
CUDA-graph replay:

- ``serial fallback``: the site's entry where the ladder decides serial at its platform check
  (no second stream: the CPU, or any platform without vLLM's aux stream);
- ``op path``: the entry as ``VLLM_OVERLAP_TEST_OP_PATH=1`` runs it (a second stream assumed):
  the whole ladder, then the stream primitive, which runs serially here (no aux stream);
  an eager step on a GPU takes this path (``when: capture`` forks only during capture);
- ``op dispatch`` (``op`` sites): the site's custom op called through PyTorch's dispatcher
  with the arguments a compiled graph holds, what a torch.compile'd step runs where it is
  not a CUDA-graph replay.

The three functions (on, off, off again) are called in interleaved rounds, rotating which
goes first, so drift and order cancel; ``added_us`` is the median over calls of (on - off)
of one round, ``p10``/``p90`` its spread; the ``off vs off`` row is the same statistic of
off against itself: the difference the machine makes alone. Each path's result is checked
against upstream's (bit-identical) before timing. Prints the table last; JSON in --out.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET_US = {"serial fallback": 5.0, "op path": 15.0, "op dispatch": 15.0}
# The lightning-indexer attributes that make a DeepSeek-V3 config a V3.2 one (index_head_dim:
# the fp8 quant block), as the layer tests use them.
V32_INDEXER = {"index_topk": 16, "index_n_heads": 4, "index_head_dim": 128}
SMOKE_SITES = ("gdn_in_proj", "delta_in_proj_kimi_gdn")  # an op site and a plain one
SMOKE_CALLS = 100
COLUMNS = ["site", "path", "calls", "off_us", "on_us", "added_us", "p10_us", "p90_us", "target_us", "within",
           "identical"]


def _v32_config():
    from vllm_overlap.testing.tiny_models import deepseek_v3_config

    config = deepseek_v3_config()
    for name, value in V32_INDEXER.items():
        setattr(config, name, value)
    return config


def site_configs() -> dict:
    """site id -> (tiny checkpoint kind for the VllmConfig, the layer's HF config factory)."""
    from vllm_overlap.testing import tiny_models as tm

    deepseek = ("deepseek-v3", _v32_config)
    qwen = "qwen3-next"
    return {
        "gdn_in_proj": (qwen, lambda: tm.qwen3_next_config(2)),
        "deepseek_indexer_v32": deepseek,
        "deepseek_indexer_legacy": deepseek,
        "mla_q_b_proj_v32": deepseek,
        "mla_q_b_proj_legacy": deepseek,
        "kv_a_proj_minicpm3": ("minicpm3", tm.minicpm3_config),
        "kv_a_proj_kimi_linear": (qwen, tm.kimi_linear_config),
        "delta_in_proj_olmo_hybrid": (qwen, tm.olmo_hybrid_config),
        "delta_in_proj_bailing_moe_v3": (qwen, tm.bailing_moe_v3_config),
        "delta_in_proj_kimi_gdn": (qwen, tm.kimi_linear_config),
    }


@contextlib.contextmanager
def _no_triton_allocator(site_id: str):
    """OLMo Hybrid's GDN ``__init__`` sets up Triton's allocator, which a CPU without Triton
    lacks: that one call is stood in while building (as the layer tests do); what the site's
    branches run is real."""
    if site_id != "delta_in_proj_olmo_hybrid":
        yield
        return
    import importlib

    module = importlib.import_module("vllm.model_executor.layers.mamba.gdn.olmo_gdn_linear_attn")
    real = module.set_triton_allocator
    module.set_triton_allocator = lambda device: None
    try:
        yield
    finally:
        module.set_triton_allocator = real


def upstream_statements(compiled):
    """Upstream's statements as one function of the entry's arguments: each branch (upstream's
    own lines) in upstream's order, their results in the form's order."""
    names = list(compiled.branches)
    text = "def upstream(*args):\n"
    text += "".join(f"    {n} = _{n}(*args)\n" for n in compiled.order)
    text += f"    return ({', '.join(names)},)\n"
    namespace = {f"_{n}": compiled.branches[n] for n in names}
    exec(compile(text, "<upstream statements>", "exec"), namespace)
    return namespace["upstream"]


def flat(value) -> list:
    if isinstance(value, (tuple, list)):
        return [x for item in value for x in flat(item)]
    return [value]


def identical(a, b) -> bool:
    import torch

    xs, ys = flat(a), flat(b)
    if len(xs) != len(ys):
        return False
    for x, y in zip(xs, ys):
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
                return False
            if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
                return False
        elif x != y:
            return False
    return True


def interleaved(on, off, calls: int, warmup: int) -> tuple[list[float], list[float], list[float]]:
    """Per-call seconds of ``on``, ``off`` and ``off`` again, called in rounds that rotate
    which goes first."""
    fns = (on, off, off)
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: tuple[list[float], list[float], list[float]] = ([], [], [])
    clock = time.perf_counter_ns
    gc.collect()
    gc.disable()
    try:
        for i in range(calls):
            for k in range(3):
                j = (i + k) % 3
                start = clock()
                fns[j]()
                times[j].append((clock() - start) / 1e3)
    finally:
        gc.enable()
    return times


def _quantiles(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=10)
    return q[0], statistics.median(values), q[-1]


def row(site_id: str, path: str, on_us: list[float], off_us: list[float], same: bool | None) -> dict:
    p10, added, p90 = _quantiles([a - b for a, b in zip(on_us, off_us)])
    target = TARGET_US.get(path)
    return {
        "site": site_id,
        "path": path,
        "calls": len(on_us),
        "off_us": statistics.median(off_us),
        "on_us": statistics.median(on_us),
        "added_us": added,
        "p10_us": p10,
        "p90_us": p90,
        "target_us": target,
        "within": None if target is None else added <= target,
        "identical": same,
    }


def paths(rt, args) -> list[tuple[str, bool, object, object]]:
    """(path, second stream assumed, on, what on must equal as a function of upstream's
    result) for each path this site takes."""
    import torch

    out = [
        ("serial fallback", False, lambda: rt(*args), lambda r: rt.site.result(*r)),
        ("op path", True, lambda: rt(*args), lambda r: rt.site.result(*r)),
    ]
    if rt.site.dynamo == "op":
        from vllm_overlap.runtime.site_runtime import LIBRARY_NAME

        op = getattr(getattr(torch.ops, LIBRARY_NAME), rt.site.op).default
        op_args = rt.op_args(*args)  # what a compiled graph holds: tensors, widths, LayerName
        out.append(("op dispatch", True, lambda: op(*op_args), lambda r: tuple(flat(r))))
    return out


def measure_site(site_id: str, rt, args, calls: int, warmup: int) -> list[dict]:
    """The rows of one site: each path against upstream's statements, and off against off."""
    import torch

    from vllm_overlap.runtime import gates
    from vllm_overlap.testing.layer_bench import overlap_everywhere

    upstream = upstream_statements(rt.compiled)

    def off():
        return upstream(*args)

    rows, noise_on, noise_off = [], [], []
    with overlap_everywhere(rt.site.feature), torch.inference_mode():
        for path, second_stream, on, expected in paths(rt, args):
            before = gates.set_overlap_possible(second_stream)
            try:
                same = identical(on(), expected(off()))
                t_on, t_off, t_off2 = interleaved(on, off, calls, warmup)
            finally:
                gates.set_overlap_possible(before)
            rows.append(row(site_id, path, t_on, t_off, same))
            noise_on += t_off2
            noise_off += t_off
    rows.insert(0, row(site_id, "off vs off", noise_on, noise_off, None))
    return rows


def measurable(site_ids) -> tuple[list[str], dict[str, str]]:
    """The sites to time, and why each other one is not timed here."""
    from vllm_overlap.sites import SITES
    from vllm_overlap.testing.layer_bench import _has_module
    from vllm_overlap.testing.layer_builders import SITE_LAYERS

    timed, why_not = [], {}
    for site_id in site_ids:
        module = SITES[site_id].targets[0].module
        if site_id not in SITE_LAYERS:
            why_not[site_id] = "layer_builders has no builder for it"
        elif SITE_LAYERS[site_id].unmeasured:
            why_not[site_id] = SITE_LAYERS[site_id].unmeasured
        elif not _has_module(module):
            why_not[site_id] = f"this vLLM has no {module}"
        else:
            timed.append(site_id)
    return timed, why_not


def run(site_ids, calls: int, warmup: int, models: str) -> tuple[list[dict], dict[str, str]]:
    import torch

    from vllm_overlap.testing.layer_bench import site_runtime, standalone_vllm
    from vllm_overlap.testing.layer_builders import SITE_LAYERS
    from vllm_overlap.testing.tiny_models import build

    timed, why_not = measurable(site_ids)
    configs = site_configs()
    rows = []
    for site_id in timed:
        kind, hf_config = configs[site_id]
        checkpoint = build(kind, os.path.join(models, kind + ("-2" if kind == "qwen3-next" else "")))
        with standalone_vllm(checkpoint) as vllm_config:
            spec, hf = SITE_LAYERS[site_id], hf_config()
            try:
                with _no_triton_allocator(site_id):
                    layer = spec.build(vllm_config, hf, torch.bfloat16, "cpu", 0)
                args = spec.inputs(layer, hf, 1, torch.bfloat16, "cpu", torch.Generator().manual_seed(0))
                rt = site_runtime(site_id)
                with torch.inference_mode():
                    rt.serial(*args)
            except Exception as exc:  # a layer this CPU cannot build or run: said, not hidden
                why_not[site_id] = f"cannot run on this CPU: {type(exc).__name__}: {exc}"
                continue
            rows += measure_site(site_id, rt, args, calls, warmup)
    return rows, why_not


def table(rows: list[dict]) -> str:
    from vllm_overlap.cli.tables import format_table

    def cell(value):
        if isinstance(value, float):
            return f"{value:.2f}"
        if isinstance(value, bool):
            return "yes" if value else "NO"
        return "-" if value is None else value

    return format_table([{c: cell(r[c]) for c in COLUMNS} for r in rows], COLUMNS)


def machine() -> dict:
    import torch

    try:
        from vllm import __version__ as vllm_version
    except ImportError:
        vllm_version = None
    return {
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "vllm": vllm_version,
        "threads": torch.get_num_threads(),
    }


def main(argv=None) -> None:
    from vllm_overlap.sites import SITES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", default=None, help="comma-separated site ids (default: every site)")
    parser.add_argument("--calls", type=int, default=5000, help="timed calls of each function per path")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--smoke", action="store_true", help=f"{', '.join(SMOKE_SITES)}, {SMOKE_CALLS} calls")
    parser.add_argument("--out", default=os.path.join(ROOT, "out", "benchmarks"))
    parser.add_argument("--models", default=None, help="where the tiny checkpoints are built (default: the cache)")
    args = parser.parse_args(argv)
    site_ids = args.sites.split(",") if args.sites else list(SMOKE_SITES if args.smoke else SITES)
    unknown = [s for s in site_ids if s not in SITES]
    if unknown:
        sys.exit(f"unknown site(s): {', '.join(unknown)}; known: {', '.join(SITES)}")
    calls, warmup = (SMOKE_CALLS, 20) if args.smoke else (args.calls, args.warmup)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    models = args.models or os.path.join(cache, "vllm-overlap", "tiny-models")
    rows, why_not = run(site_ids, calls, warmup, models)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "host_overhead" + ("-smoke" if args.smoke else "") + ".json")
    report = {"machine": machine(), "tokens": 1, "calls": calls, "targets_us": TARGET_US,
              "command": " ".join(["python", "benchmarks/host_overhead.py", *(argv or sys.argv[1:])]),
              "rows": rows, "not_measured": why_not}
    with open(path, "w") as fh:
        json.dump(report, fh, indent=1)
    over = [f"{r['site']} {r['path']}" for r in rows if r["within"] is False]
    lines = [f"$ {report['command']}"]
    lines += [f"{site_id}: not measured: {why}" for site_id, why in why_not.items()]
    lines.append("over target: " + (", ".join(over) if over else "none"))
    lines += ["", f"host time per call, 1 token, bf16, {calls} interleaved calls (microseconds)", table(rows)]
    text = "\n".join(lines) + "\n"
    with open(path[: -len(".json")] + ".txt", "w") as fh:
        fh.write(text)
    print(f"saved {path} and its table (.txt)")
    print(text, end="")


if __name__ == "__main__":
    main()
