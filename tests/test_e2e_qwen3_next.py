"""End to end through vllm.LLM on the CPU with a tiny Qwen3-Next: overlay on vs off.

Slow (each run starts a vLLM engine in a fresh process); `.ci/run` runs them.
The CPU has no aux stream, so these prove the rewritten model is the same computation, that
the plugin loads and applies in every process that builds the model, and what compile sees.
"""

from __future__ import annotations

import re

import pytest
from conftest import run_llm

pytestmark = pytest.mark.slow

OFF = {"VLLM_OVERLAP": "0"}
# The CPU has no second stream: with the switch the overlay takes its op path (serially);
# without it the rewritten code runs the upstream statements (checked once, below).
ON = {"VLLM_OVERLAP": "1", "VLLM_OVERLAP_TEST_OP_PATH": "1"}
ON_DEFAULT = {"VLLM_OVERLAP": "1", "VLLM_OVERLAP_TEST_OP_PATH": "0"}
# A process may log a first line before it imports the GDN module (vLLM imports the MLA and
# DeepSeek modules early, and those features apply there), then an "(update)" line.
APPLIED = re.compile(
    r"vllm-overlap 0\.1\.0 \[pid (\d+)\] config built-in defaults(?: \(update\))?: "
    r"gdn_in_proj applied \(4/4 targets\)"
)


def _applied_pids(log: str) -> set[str]:
    return set(APPLIED.findall(log))


def test_eager_on_off_identical(model_dirs):
    on = run_llm(model_dirs(2), env=ON)
    on_default = run_llm(model_dirs(2), env=ON_DEFAULT)
    off = run_llm(model_dirs(2), env=OFF)
    assert on["token_ids"] == off["token_ids"] == on_default["token_ids"]
    assert "gdn_in_proj applied (4/4 targets)" in on_default["summary"]
    assert len(on["token_ids"]) == 4 and all(len(t) == 8 for t in on["token_ids"])
    assert "gdn_in_proj applied (4/4 targets)" in on["summary"]
    assert "gdn_in_proj off" in off["summary"] and not _applied_pids(off["log"])
    # the site census: both GDN layers of the tiny model run the site and overlap
    row = {"feature": "gdn_in_proj", "mode": "dual_stream", "layers": 2, "overlap": 2, "serial": {}}
    assert on["sites"] == on_default["sites"] == {"gdn_in_proj": row}
    assert "vllm-overlap site gdn_in_proj: 2 of 2 layers overlap\n" in on["log"]
    assert (
        "vllm-overlap site gdn_in_proj: 2 of 2 layers overlap; this platform has no second "
        "stream: upstream's statements run serially" in on_default["log"]
    )
    assert off["sites"] == {}
    print(f"\neager on/off identical; generate {on['generate_s']}s / {off['generate_s']}s")


@pytest.fixture(scope="module")
def compiled_runs(model_dirs, tmp_path_factory):
    runs = {}
    for layers in (2, 4):
        for name, env in (("on", ON), ("off", OFF)):
            cache = tmp_path_factory.mktemp(f"vllm-cache-{name}-{layers}")
            runs[name, layers] = run_llm(
                model_dirs(layers), "--compile", env={**env, "VLLM_CACHE_ROOT": str(cache)}
            )
    return runs


@pytest.mark.parametrize("layers", [2, 4])
def test_compiled_on_off_identical(compiled_runs, layers):
    on, off = compiled_runs["on", layers], compiled_runs["off", layers]
    assert on["token_ids"] == off["token_ids"]
    assert "gdn_in_proj applied (4/4 targets)" in on["summary"]
    assert on["graph_breaks"] == 0 and on["dynamo_unique_graphs"] >= 1


def test_compiled_graphs_do_not_grow_with_gdn_layers(compiled_runs):
    two, four = compiled_runs["on", 2], compiled_runs["on", 4]
    assert two["dynamo_unique_graphs"] == four["dynamo_unique_graphs"]
    assert two["inductor_artefacts"] and two["inductor_artefacts"] == four["inductor_artefacts"]
    rows = [
        f"{name} {layers} GDN layers: graphs {r['dynamo_unique_graphs']}, breaks {r['graph_breaks']}, "
        f"inductor artefacts {r['inductor_artefacts']}, cold start-up {r['init_s']}s"
        for (name, layers), r in sorted(compiled_runs.items())
    ]
    ratio = compiled_runs["on", 2]["init_s"] / compiled_runs["off", 2]["init_s"]
    print("\n" + "\n".join(rows) + f"\ncold compile start-up on/off (2 layers): {ratio:.3f}")


# vLLM prefixes each line a child process logs with its role and pid.
OWN_APPLIED = re.compile(r"\(\w[\w-]* pid=(\d+)\)[^\n]*" + APPLIED.pattern)
LOADS_MODEL = re.compile(r"\(\w[\w-]* pid=(\d+)\)[^\n]*Starting to load model")


def test_default_multiprocess_engine_loads_and_applies_in_engine_core(model_dirs):
    """vLLM's default: the model is built in a child process (engine core or its worker),
    not ours. The process that builds it applied the rewrite, by its own log line; the
    front-end may or may not have imported the model code (vLLM's business: it differs by
    machine), so nothing is asserted about it."""
    run = run_llm(model_dirs(2), "--multiproc", env=ON)
    main_pid = re.search(r"\[pid (\d+)\]", run["summary"]).group(1)
    builders = set(LOADS_MODEL.findall(run["log"]))
    applied = {pid for pid, own_pid in OWN_APPLIED.findall(run["log"]) if pid == own_pid}
    assert builders and main_pid not in builders, run["log"][-3000:]
    assert builders <= applied, (builders, applied, run["log"][-3000:])
    assert len(run["token_ids"]) == 4 and all(len(t) == 8 for t in run["token_ids"])


def test_tensor_parallel_2_on_off_identical_and_every_worker_applies(model_dirs):
    on = run_llm(model_dirs(2), "--tp", "2", env=ON)
    off = run_llm(model_dirs(2), "--tp", "2", env=OFF)
    assert on["token_ids"] == off["token_ids"]
    workers = set(re.findall(r"\(Worker_TP(\d) pid=(\d+)\)[^\n]*gdn_in_proj applied \(4/4 targets\)", on["log"]))
    assert {rank for rank, _ in workers} == {"0", "1"}, on["log"][-3000:]
    assert not _applied_pids(off["log"])


def test_bad_config_stops_vllm_start_up_with_one_message(model_dirs, tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("features:\n  gdn_in_proj: {enabled: true, max_tokens: lots}\n")
    with pytest.raises(AssertionError) as info:
        run_llm(model_dirs(2), env={"VLLM_OVERLAP_CONFIG": str(cfg)})
    log = str(info.value)
    assert f"vllm-overlap: config {cfg}: features.gdn_in_proj.max_tokens = 'lots'" in log
    assert "rc 1" in log and "Traceback" not in log


def test_compile_cache_is_not_shared_across_an_overlay_toggle(model_dirs, tmp_path):
    """One cache root, three compiled runs: on, off, on. The on-runs use one cache
    directory, the off-run another, and every run generates the same tokens."""
    cache = {"VLLM_CACHE_ROOT": str(tmp_path / "shared-cache")}
    runs = [run_llm(model_dirs(2), "--compile", env={**env, **cache}) for env in (ON, OFF, ON)]
    assert runs[0]["token_ids"] == runs[1]["token_ids"] == runs[2]["token_ids"]

    def cache_dirs(run):
        return set(re.findall(r"torch_aot_compile/([0-9a-f]{16,})/", run["log"]))

    on1, off, on2 = (cache_dirs(r) for r in runs)
    assert len(on1) == 1 and on1 == on2, (on1, on2)
    assert off and off.isdisjoint(on1), (off, on1)
    print(f"\ncompile cache dirs: on {sorted(on1)[0][:12]}, off {sorted(off)[0][:12]}, on again {sorted(on2)[0][:12]}")


FUSED_LINE = re.compile(
    r"(?:\((\w+) pid=\d+\) )?[^\n]*vllm-overlap gdn_in_proj fused (\d+)/(\d+) GDN layers "
    r"\(projection parameter bytes (\d+) before, (\d+) after\)"
)


@pytest.mark.parametrize("tp", [1, 2])
def test_fused_mode_on_off_identical(model_dirs, tmp_path, tp):
    cfg = tmp_path / "fused.yaml"
    cfg.write_text("features: {gdn_in_proj: {mode: fused}}\n")
    flags = ("--tp", str(tp))
    fused = run_llm(model_dirs(2), *flags, env={"VLLM_OVERLAP_CONFIG": str(cfg)})
    off = run_llm(model_dirs(2), *flags, env=OFF)
    assert fused["token_ids"] == off["token_ids"]
    lines = FUSED_LINE.findall(fused["log"])
    assert len(lines) == tp, fused["log"][-3000:]
    for _, done, total, before, after in lines:
        assert done == total == "2" and before == after and int(before) > 0
    print(f"\nfused TP={tp}: " + "; ".join(f"{w or 'main'} {d}/{t} layers, bytes {b} -> {a}" for w, d, t, b, a in lines))
