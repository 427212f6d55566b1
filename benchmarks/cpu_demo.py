"""The CPU demo: tiny Qwen3-Next, DeepSeek-V3 and MiniCPM3 served through vLLM with the overlay, on and off.

    bash .ci/run demo            (or: python benchmarks/cpu_demo.py [--eager-only])

Builds the models offline, prints ``vllm-overlap doctor`` for the installed vLLM, then generates
greedily with the built-in default config and with ``VLLM_OVERLAP=0``, eager and compiled, each
in a fresh process with a cold compile cache, and prints whether the token ids are identical.
DeepSeek-V3 is MLA without an indexer (DeepSeek-V3.2 does not run on the CPU): it shows the
DeepSeek rewrites applied and its layers left serial for that reason. MiniCPM3's attention layers
run kv_a_proj (its census rows are printed); a second MiniCPM3 row runs the same pair declared as
a user site in a config file (``sites:``, built-in kv_a_proj off), proven before it runs.
On the CPU there is no aux stream, so the overlay runs its serial path: this shows that it is
correct, not that it is faster. The table gives no generate time: each row is one cold run per
setting in a fresh process, whose times differ run to run by more than anything the overlay
could change (warm repeats of the same runs are within noise). Speed is measured where it can
be: ``benchmarks/site_regions.py`` and ``benchmarks/pairs.py`` (medians of warm repeats with
their noise) and, on a GPU, ``gpu/`` (docs/gpu.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from vllm_overlap.testing.tiny_models import build

# The user-site row's config: MiniCPM3's q path beside kv_a_proj_with_mqa, declared by hand
# (the example of docs/user-sites.md).
USER_SITE_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "user-site-minicpm3.yaml"
)


def run(model: str, overlay: bool, compiled: bool, cache_root: str, config: str | None = None) -> dict:
    env = dict(os.environ, VLLM_CACHE_ROOT=cache_root)
    env.pop("VLLM_OVERLAP_CONFIG", None)
    env["VLLM_OVERLAP"] = "1" if overlay else "0"
    if config and overlay:
        env["VLLM_OVERLAP_CONFIG"] = config
    # No second stream here: make the overlay take its op path (serially), so the demo runs
    # the code a GPU runs, minus the fork. Without it the CPU simply runs upstream statements.
    env["VLLM_OVERLAP_TEST_OP_PATH"] = "1"
    cmd = [sys.executable, "-m", "vllm_overlap.testing.llm_runner", model]
    if compiled:
        cmd.append("--compile")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"vLLM run failed (overlay={overlay}, compiled={compiled})")
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eager-only", action="store_true", help="skip the compiled runs")
    args = parser.parse_args()

    cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vllm-overlap")
    models = {
        "Qwen3-Next": build("qwen3-next", os.path.join(cache, "tiny-models", "qwen3-next-2")),
        "DeepSeek-V3": build("deepseek-v3", os.path.join(cache, "tiny-models", "deepseek-v3")),
        "MiniCPM3": build("minicpm3", os.path.join(cache, "tiny-models", "minicpm3")),
    }
    models["MiniCPM3 (user site)"] = models["MiniCPM3"]
    configs = {"MiniCPM3 (user site)": USER_SITE_CONFIG}
    print(f"tiny Qwen3-Next (2 GDN layers + 1 attention layer, random bf16 weights): {models['Qwen3-Next']}")
    print(f"tiny DeepSeek-V3 (2 MLA layers, no indexer, random bf16 weights): {models['DeepSeek-V3']}")
    print(f"tiny MiniCPM3 (2 attention layers, random bf16 weights): {models['MiniCPM3']}\n")

    env = {k: v for k, v in os.environ.items() if k != "VLLM_OVERLAP_CONFIG"}
    doctor = subprocess.run(
        [sys.executable, "-m", "vllm_overlap.cli", "doctor"],
        env=env,
        capture_output=True,
        text=True,
    )
    print("$ vllm-overlap doctor")
    print(doctor.stdout.rstrip() or doctor.stderr[-2000:])
    print()

    rows = []
    modes = [False] if args.eager_only else [False, True]
    for (name, model), compiled in [(m, c) for m in models.items() for c in modes]:
        results = {}
        for overlay in (True, False):
            with tempfile.TemporaryDirectory(prefix="vllm-overlap-demo-") as cache_root:
                results[overlay] = run(model, overlay, compiled, cache_root, configs.get(name))
        on, off = results[True], results[False]
        rows.append(
            {
                "model": name,
                "mode": "torch.compile" if compiled else "eager",
                "cold start-up on/off s": f"{on['init_s']:.1f} / {off['init_s']:.1f}",
                "sequences": len(on["token_ids"]),
                "identical token ids": "yes" if on["token_ids"] == off["token_ids"] else "NO",
            }
        )
        print(f"[{name}, {rows[-1]['mode']}] overlay on:  {on['summary']}")
        for feature, report in on["post_load"].items():
            print(f"[{name}, {rows[-1]['mode']}]   after load, {feature}: {json.dumps(report)}")
        for site, row in on.get("sites", {}).items():
            print(f"[{name}, {rows[-1]['mode']}]   census, site {site}: {json.dumps(row)}")

    from vllm_overlap.cli.tables import format_table

    print("\nOverlay on vs off (greedy, 4 prompts x 8 tokens; start-up is one cold run each, compile included):")
    print(format_table(rows, list(rows[0])))
    print(
        "Not a speed measurement: one cold run per setting (no second stream on a CPU either). Speed, as\n"
        "medians of warm repeats with their noise: benchmarks/site_regions.py, benchmarks/pairs.py; on a GPU,\n"
        "gpu/ (docs/gpu.md)."
    )
    if any(r["identical token ids"] != "yes" for r in rows):
        raise SystemExit("overlay on and off differ")


if __name__ == "__main__":
    main()
