"""Each overlap site's GEMMs at real model shapes: serial vs dual-stream vs fused, per token count.

    python benchmarks/pairs.py                 # on a CUDA GPU: every site, model, tp, dtype
    python benchmarks/pairs.py --sites gdn_in_proj --tp 1 --dtypes bf16
    python benchmarks/pairs.py --smoke         # anywhere (the CPU): tiny shapes, serial only

Needs torch only (no vLLM, no pydantic; matplotlib for the figure where it is installed): shapes
come from ``benchmarks/model_shapes.py``, the fork/join is the project's own
``vllm_overlap.runtime.streams.fork_join`` on a real second stream. On a GPU each variant is
captured in a CUDA graph (``--inner`` copies of the region per graph) and replayed; each replay
is timed with CUDA events and the median taken, in ``--rounds`` interleaved rounds (the median
of the round medians is reported; ``noise`` is the spread of serial across rounds,
(max - min) / median). Variants: ``serial`` (branch 0 then branch 1, one stream),
``dual`` (branch 1 on the aux stream), ``fused`` (one concatenated GEMM, then the split the
product makes, where the site has that form), and each branch alone: ``bound`` =
max(branch) is what perfect overlap could reach, ``sum`` = branch 0 + branch 1.

Outputs are checked: dual-stream must equal serial bit for bit (the same kernels on the same
inputs); fused is another GEMM shape, so its largest difference from serial is reported.
FP8 (e4m3, row-wise scales, ``torch._scaled_mm``) runs where the GPU and torch support it.
Weights stay in L2 across replays for the smaller GEMMs, for every variant alike.

Prints the table last; writes ``pairs-<device>.json`` and ``.png`` in ``--out``, and the token
ranges per site where dual-stream beat serial by more than the noise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from model_shapes import (  # noqa: E402
    SITES,
    TOKEN_COUNTS,
    TP_SIZES,
    Bmm,
    Branch,
    Gemm,
    LayerNorm,
    PairShapes,
    RMSNorm,
    models_for,
    replicated,
    site_shapes,
)

from vllm_overlap.runtime.streams import fork_join, fork_join_many  # noqa: E402  (torch only)

# --------------------------------------------------------------------------------------------
# The computation of a branch
# --------------------------------------------------------------------------------------------


class BranchRunner:
    """Weights and the op sequence of one branch, at one dtype, on one device."""

    def __init__(self, branch: Branch, dtype: str, device: torch.device, gen: torch.Generator):
        self.branch = branch
        self.dtype = dtype
        self.params: list = []
        for op in branch.ops:
            if isinstance(op, Gemm):
                w = torch.randn(op.n, op.k, generator=gen) * op.k**-0.5
                self.params.append(_gemm_weight(w.to(device), dtype))
            elif isinstance(op, Bmm):
                w = torch.randn(op.heads, op.k, op.n, generator=gen) * op.k**-0.5
                self.params.append(w.to(device=device, dtype=torch.bfloat16))
            elif isinstance(op, LayerNorm):
                weight = 1 + 0.05 * torch.randn(op.width, generator=gen)
                bias = 0.05 * torch.randn(op.width, generator=gen)
                self.params.append((weight.to(device), bias.to(device)))
            elif isinstance(op, RMSNorm):
                weight = 1 + 0.05 * torch.randn(op.width, generator=gen)
                self.params.append(weight.to(device))

    def __call__(self, x) -> list[torch.Tensor]:
        outs = []
        y = None
        for op, p in zip(self.branch.ops, self.params):
            if isinstance(op, Gemm):  # on the previous op's output, or the branch's input
                y = _gemm(x if y is None or op.from_input else y, p)
            elif isinstance(op, Bmm):
                q = y.view(y.shape[0], op.heads, op.width)[..., : op.k].transpose(0, 1)
                y = torch.bmm(q, p)
            elif isinstance(op, LayerNorm):
                k = y[:, : op.width]
                y = F.layer_norm(k.float(), (op.width,), p[0], p[1]).to(torch.bfloat16)
            elif isinstance(op, RMSNorm):
                y = F.rms_norm(y.float(), (op.width,), p, eps=1e-6).to(torch.bfloat16)
            outs.append(y)
        return outs


def _gemm_weight(w: torch.Tensor, dtype: str):
    if dtype == "bf16":
        return w.to(torch.bfloat16)
    wq, scale = _quantize_rows(w)
    return wq, scale.view(1, -1)  # _scaled_mm: scale_b is [1, n]


def _quantize_rows(x: torch.Tensor):
    """Row-wise e4m3: ``x ~= q * scale`` with one float32 scale per row."""
    amax = x.float().abs().amax(dim=-1, keepdim=True).clamp(min=1e-12)
    scale = amax / torch.finfo(torch.float8_e4m3fn).max
    return (x.float() / scale).to(torch.float8_e4m3fn), scale.float()


def _gemm(x, w):
    if isinstance(w, torch.Tensor):
        return F.linear(x, w)
    (xq, x_scale), (wq, w_scale) = x, w
    return torch._scaled_mm(xq, wq.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=torch.bfloat16)


def make_input(width: int, tokens: int, dtype: str, device, gen):
    x = (torch.randn(tokens, width, generator=gen)).to(device)
    if dtype == "bf16":
        return x.to(torch.bfloat16)
    return _quantize_rows(x)  # activations quantized in advance: the GEMM alone is timed


def fp8_unsupported(device: torch.device, shapes: PairShapes) -> str | None:
    """Why FP8 cannot run here (None: it can)."""
    if device.type != "cuda":
        return "FP8 GEMMs need a CUDA GPU"
    if torch.cuda.get_device_capability(device) < (8, 9):
        return "FP8 GEMMs need compute capability 8.9 or newer"
    if not hasattr(torch, "_scaled_mm") or not hasattr(torch, "float8_e4m3fn"):
        return "this torch has no torch._scaled_mm / float8_e4m3fn"
    for branch in shapes.branches:
        for op in branch.ops:
            if isinstance(op, Gemm) and (op.k % 16 or op.n % 16):
                return f"{op.name} is {op.k} x {op.n}: _scaled_mm needs multiples of 16"
    return None


class Pair:
    """Every branch of one site (two, or a fan-out's three or more) at one shape and dtype,
    with every variant as a callable."""

    def __init__(self, shapes: PairShapes, dtype: str, device: torch.device, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.shapes = shapes
        self.dtype = dtype
        self.device = device
        self.runners = [BranchRunner(b, dtype, device, gen) for b in shapes.branches]
        self.b0, self.b1 = self.runners[:2]
        self.fused_weight = None
        if shapes.fused and dtype == "bf16":
            self.fused_weight = torch.cat([self.b0.params[0], self.b1.params[0]], dim=0)
            self.widths = (shapes.branch0.ops[0].n, shapes.branch1.ops[0].n)
        self.aux = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.more_aux = [torch.cuda.Stream(device) for _ in shapes.more] if self.aux is not None else []

    def inputs(self, tokens: int, seed: int = 1) -> dict:
        gen = torch.Generator().manual_seed(seed)
        found = {}
        for branch in self.shapes.branches:
            if branch.input not in found:
                found[branch.input] = make_input(branch.input_width, tokens, self.dtype, self.device, gen)
        return found

    def variants(self, x: dict) -> dict[str, Callable[[], list]]:
        in0 = x[self.shapes.branch0.input]
        branches = [
            lambda runner=runner, b=b: runner(x[b.input]) for runner, b in zip(self.runners, self.shapes.branches)
        ]
        branch0, branch1 = branches[:2]

        def serial():
            return [out for branch in branches for out in branch()]

        out = {"serial": serial, **{f"branch{i}": branch for i, branch in enumerate(branches)}}
        if self.aux is not None and self.shapes.more:

            def dual():  # the fan-out: each aux branch on a stream of its own
                r0, rest = fork_join_many(
                    f"pairs:{self.shapes.site}", branch0, branches[1:], [self.aux, *self.more_aux]
                )
                return [*r0, *(o for r in rest for o in r)]

            out["dual"] = dual
        elif self.aux is not None:

            def dual():
                r0, r1 = fork_join(f"pairs:{self.shapes.site}", branch0, branch1, self.aux)
                return [*r0, *r1]

            out["dual"] = dual
        if self.fused_weight is not None:

            def fused():  # one GEMM, then the split the product's fused mode makes
                y = F.linear(in0, self.fused_weight)
                a, b = y.split(self.widths, dim=-1)
                return [a.contiguous(), b.contiguous()]

            out["fused"] = fused
        return out


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


class GraphTimer:
    """A variant captured ``inner`` times in one CUDA graph; each replay timed with events."""

    def __init__(self, fn: Callable[[], list], inner: int):
        self.inner = inner
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()  # warm-up: cuBLAS handles, workspaces, lazy init outside capture
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            for _ in range(inner):
                self.outputs = fn()
        self.graph.replay()
        torch.cuda.synchronize()
        self.start = torch.cuda.Event(enable_timing=True)
        self.end = torch.cuda.Event(enable_timing=True)

    def once(self) -> float:
        """Seconds per region, one replay."""
        self.start.record()
        self.graph.replay()
        self.end.record()
        self.end.synchronize()
        return self.start.elapsed_time(self.end) / 1e3 / self.inner

    def median(self, reps: int) -> float:
        return statistics.median(self.once() for _ in range(reps))


class CpuTimer:
    def __init__(self, fn: Callable[[], list], inner: int):
        self.fn = fn
        self.inner = inner
        self.outputs = fn()

    def once(self) -> float:
        start = time.perf_counter()
        for _ in range(self.inner):
            self.outputs = self.fn()
        return (time.perf_counter() - start) / self.inner

    def median(self, reps: int) -> float:
        return statistics.median(self.once() for _ in range(reps))


def measure(pair: Pair, tokens: int, args) -> dict:
    x = pair.inputs(tokens)
    variants = pair.variants(x)
    timer_cls = GraphTimer if pair.device.type == "cuda" else CpuTimer
    timers = {name: timer_cls(fn, args.inner) for name, fn in variants.items()}
    # replays per timing: about --budget-ms of work per variant and round, within bounds
    one = timers["serial"].once()
    reps = max(args.min_reps, min(args.reps, int(args.budget_ms / 1e3 / max(one * args.inner, 1e-9))))
    rounds: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(args.rounds):
        for name, timer in timers.items():
            rounds[name].append(timer.median(reps))
    t = {name: statistics.median(v) for name, v in rounds.items()}
    serial_rounds = rounds["serial"]
    row = {
        "site": pair.shapes.site,
        "model": pair.shapes.model,
        "tp": pair.shapes.tp,
        "dtype": pair.dtype,
        "tokens": tokens,
        "serial_us": t["serial"] * 1e6,
        **{f"branch{i}_us": t[f"branch{i}"] * 1e6 for i in range(len(pair.runners))},
        "bound_us": max(t[f"branch{i}"] for i in range(len(pair.runners))) * 1e6,
        "sum_us": sum(t[f"branch{i}"] for i in range(len(pair.runners))) * 1e6,
        "noise": (max(serial_rounds) - min(serial_rounds)) / t["serial"],
        "reps": reps,
    }
    reference = timers["serial"].outputs
    if "dual" in t:
        row["dual_us"] = t["dual"] * 1e6
        row["dual/serial"] = t["dual"] / t["serial"]
        row["bound/serial"] = row["bound_us"] / row["serial_us"]
        row["dual_equal"] = all(torch.equal(a, b) for a, b in zip(timers["dual"].outputs, reference))
    if "fused" in t:
        row["fused_us"] = t["fused"] * 1e6
        row["fused/serial"] = t["fused"] / t["serial"]
        fused_out = timers["fused"].outputs
        row["fused_max_abs_diff"] = max(
            float((a.float() - b.float()).abs().max()) if a.numel() else 0.0
            for a, b in zip(fused_out, (reference[0], reference[-1]))
        )
    del timers
    return row


# --------------------------------------------------------------------------------------------
# What to run
# --------------------------------------------------------------------------------------------


def plan(args, device: torch.device) -> tuple[list, list[str]]:
    """(shapes, dtype, token counts) to measure, with the reasons for what is left out."""
    jobs, skipped = [], []
    for site in args.sites:
        for model in args.models or models_for(site):
            if model not in models_for(site):
                continue
            for tp in args.tp:
                try:
                    shapes = site_shapes(site, model, tp)
                except ValueError as exc:
                    skipped.append(f"{site} {model} tp={tp}: {exc}")
                    continue
                if replicated(shapes) and tp != args.tp[0]:
                    continue  # the same shapes as the first tp: measured once
                for dtype in args.dtypes:
                    why = fp8_unsupported(device, shapes) if dtype == "fp8" else None
                    if why:
                        skipped.append(f"{site} {model} tp={tp} fp8: {why}")
                        continue
                    jobs.append((shapes, dtype, list(args.tokens)))
    jobs.sort(key=lambda job: job[1] != "bf16")  # every bf16 shape before any FP8 one
    return jobs, skipped


def smoke_shapes() -> list[PairShapes]:
    """Tiny versions of every site's shapes (the CPU smoke pass)."""
    gdn = dict(hidden_size=64, linear_num_key_heads=2, linear_key_head_dim=16,
               linear_num_value_heads=4, linear_value_head_dim=16)
    mla = dict(hidden_size=64, num_attention_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8)
    tiny = {
        "gdn": dict(gdn, family="gdn"),
        "dsa": dict(mla, family="dsa", q_lora_rank=32, index_n_heads=4, index_head_dim=16),
        "minicpm3": dict(mla, family="minicpm3", q_lora_rank=32),
        "olmo_hybrid": dict(gdn, family="olmo_hybrid"),
        "bailing_moe_v3": dict(family="bailing_moe_v3", hidden_size=64, num_attention_heads=4, head_dim=16),
        "kimi_linear": dict(mla, family="kimi_linear", kda_num_heads=4, kda_head_dim=16),
    }
    return [PairShapes(site, f"tiny-{family}", 1, *build(tiny[family], 1)) for site, (family, build) in SITES.items()]


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def ranges(tokens: list[int]) -> str:
    """'1-64, 1024' style: consecutive measured token counts joined."""
    if not tokens:
        return "none"
    parts, run = [], [tokens[0]]
    for t in tokens[1:]:
        if t == run[-1] * 2:
            run.append(t)
        else:
            parts.append(run)
            run = [t]
    parts.append(run)
    return ", ".join(f"{r[0]}" if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in parts)


def wins(rows: list[dict]) -> list[str]:
    """Per site, model, tp and dtype: the token counts where dual beat serial beyond noise."""
    lines = []
    keys = sorted({(r["site"], r["model"], r["tp"], r["dtype"]) for r in rows if "dual/serial" in r})
    for key in keys:
        sel = [r for r in rows if (r["site"], r["model"], r["tp"], r["dtype"]) == key]
        won = [r["tokens"] for r in sel if r["dual/serial"] < 1 - r["noise"]]
        best = min(sel, key=lambda r: r["dual/serial"])
        site, model, tp, dtype = key
        lines.append(
            f"{site:24s} {model:20s} tp={tp} {dtype:4s} dual beats serial beyond noise at "
            f"tokens {ranges(won)} (best {best['dual/serial']:.3f} at {best['tokens']})"
        )
    return lines


COLUMNS_GPU = [
    "site",
    "model",
    "tp",
    "dtype",
    "tokens",
    "serial_us",
    "dual_us",
    "fused_us",
    "bound_us",
    "sum_us",
    "dual/serial",
    "fused/serial",
    "bound/serial",
    "noise",
    "dual_equal",
]
COLUMNS_CPU = ["site", "model", "tp", "dtype", "tokens", "serial_us", "branch0_us", "branch1_us", "noise"]


def table(rows: list[dict], columns: list[str]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
        return "-" if v is None else str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def plot(rows: list[dict], path: str, title: str) -> bool:
    """The figure, where matplotlib is installed (the GPU image's torch may come without it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False

    sites = list(dict.fromkeys(r["site"] for r in rows))
    fig, axes = plt.subplots(1, len(sites), figsize=(5 * len(sites), 4), squeeze=False)
    gpu = any("dual/serial" in r for r in rows)
    for ax, site in zip(axes[0], sites):
        sel = [r for r in rows if r["site"] == site]
        for key in dict.fromkeys((r["model"], r["tp"], r["dtype"]) for r in sel):
            line = [r for r in sel if (r["model"], r["tp"], r["dtype"]) == key]
            tokens = [r["tokens"] for r in line]
            label = f"{key[0]} tp{key[1]} {key[2]}"
            if gpu:
                ax.plot(tokens, [r["dual/serial"] for r in line], "o-", ms=3, label=label)
            else:
                ax.plot(tokens, [r["serial_us"] for r in line], "o-", ms=3, label=label)
        if gpu:
            ax.axhline(1.0, color="grey", lw=0.8)
            ax.set_ylabel("dual-stream / serial (lower is faster)")
        else:
            ax.set_ylabel("serial us (CPU smoke)")
            ax.set_yscale("log")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens")
        ax.set_title(site, fontsize=9)
        ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "-")
    return "cpu"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", nargs="+", default=list(SITES), choices=list(SITES))
    parser.add_argument("--models", nargs="+", default=None)
    parser.add_argument("--tp", nargs="+", type=int, default=list(TP_SIZES))
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp8"], choices=["bf16", "fp8"])
    parser.add_argument("--tokens", nargs="+", type=int, default=list(TOKEN_COUNTS))
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per variant")
    parser.add_argument("--reps", type=int, default=50, help="most replays per timing")
    parser.add_argument("--min-reps", type=int, default=10)
    parser.add_argument("--budget-ms", type=float, default=15.0, help="work per timing")
    parser.add_argument("--inner", type=int, default=10, help="copies of the region per graph")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, serial only (any device)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(HERE), "out", "pairs"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    os.makedirs(args.out, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False

    if args.smoke or device.type != "cuda":
        args.smoke = True
        args.dtypes, args.tokens = ["bf16"], [1, 4, 16]
        args.rounds, args.reps, args.min_reps, args.inner = 2, 3, 3, 2
        jobs, skipped = [(s, "bf16", args.tokens) for s in smoke_shapes()], []
    else:
        jobs, skipped = plan(args, device)
    name = device_name(device) + ("-smoke" if args.smoke else "")
    print(f"pairs: {len(jobs)} shapes x dtypes on {name} (torch {torch.__version__})", flush=True)
    for line in skipped:
        print(f"  skipped {line}")

    meta = {
        "device": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "skipped": skipped,
    }
    json_path = os.path.join(args.out, f"pairs-{name}.json")

    def save(rows: list[dict], complete: bool) -> None:  # after every job: a timeout keeps them
        unequal = sum(r.get("dual_equal") is False for r in rows)
        with open(json_path, "w", encoding="utf-8") as fh:
            json.dump(
                {"meta": {**meta, "complete": complete, "dual_not_bitwise_equal": unequal}, "rows": rows}, fh, indent=1
            )

    rows, started = [], time.perf_counter()
    for shapes, dtype, tokens in jobs:
        try:  # one shape that a kernel refuses must not cost the rest of a GPU session
            pair = Pair(shapes, dtype, device)
            if args.smoke:
                pair.aux = None  # serial path only
            for n in tokens:
                rows.append(measure(pair, n, args))
        except Exception as exc:
            meta["skipped"].append(
                f"{shapes.site} {shapes.model} tp={shapes.tp} {dtype}: failed: {type(exc).__name__}: {exc}"
            )
            print(f"  {meta['skipped'][-1]}", flush=True)
            continue
        last = rows[-1]
        print(
            f"  {shapes.site} {shapes.model} tp={shapes.tp} {dtype}: done "
            f"({time.perf_counter() - started:.0f}s; at {last['tokens']} tokens serial "
            f"{last['serial_us']:.1f} us"
            + (f", dual/serial {last['dual/serial']:.3f})" if "dual/serial" in last else ")"),
            flush=True,
        )
        save(rows, complete=False)
        del pair
        if device.type == "cuda":
            torch.cuda.empty_cache()
    save(rows, complete=True)
    unequal = [r for r in rows if r.get("dual_equal") is False]
    png_path = os.path.join(args.out, f"pairs-{name}.png")
    if plot(rows, png_path, f"overlap pairs on {name}, torch {torch.__version__}"):
        print(f"\nwrote {json_path} and {png_path}")
    else:
        print(f"\nwrote {json_path} (no figure: matplotlib is not installed)")
    if not args.smoke:
        print(f"dual-stream outputs bitwise equal to serial: {len(rows) - len(unequal)}/{len(rows)}")
        print("\n".join(wins(rows)))
    print()
    print(table(rows, COLUMNS_CPU if args.smoke else COLUMNS_GPU))
    return 1 if unequal else 0


if __name__ == "__main__":
    sys.exit(main())
