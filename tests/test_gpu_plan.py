"""gpu/plan.py: a GPU session's calls fit its device time, and tier 1 needs nothing but torch.

The budget is added up here from the plan's calls and the documented constants (start, per-call
gap, transfer per part, close, tier 1 once more), not read from ``plan.budget``. Tier 1's
imports are checked twice: statically (every import of every file tier 1 runs, following the
project's own modules) and by running its entry points with vLLM, pydantic, PyYAML,
transformers and matplotlib made unimportable.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

from conftest import ROOT, clean_env

sys.path.insert(0, os.path.join(ROOT, "gpu"))

import plan  # noqa: E402
import suite  # noqa: E402

MiB = 2**20


def test_the_plan_with_a_rerun_of_tier_1_fits_fifteen_minutes():
    for parts in (1, 2, 3, 4):
        calls = plan.calls([f"part-{i:02d}" for i in range(parts)])
        tier1 = [c for c in calls if c.tier == 1]
        assert calls[0].tier == 1 and len(tier1) == 1 and not tier1[0].carry  # first, and no bundle
        per_call = [c.timeout_s + 15 + 10 * sum("part-" in p for p in c.carry) for c in calls]
        total = 240 + sum(per_call) + per_call[0] + 10
        assert total == plan.budget(calls)["total_s"]
        if parts <= 3:  # the bundle as built (3 parts of 60 MiB) or smaller
            assert total <= 900, (parts, total)
    assert (plan.START_S, plan.GAP_S, plan.TRANSFER_S, plan.CLOSE_S, plan.BUDGET_S) == (240, 15, 10, 10, 900)


def test_each_call_covers_its_steps_and_stays_within_the_device_limits():
    calls = plan.calls(["part-00", "part-01", "part-02"])
    assert [c.steps for c in calls] == [suite.TIERS[1], (), (), ("e2e",), ("decode_qwen3_next",)]
    assert set(suite.TIERS[2]) == {"e2e", "decode_qwen3_next"}
    for c in calls:
        assert c.timeout_s <= 600
        needed = sum(suite.STEPS[s].limit_s for s in c.steps)
        if "install" in c.command:
            needed += plan.INSTALL_S + plan.RECEIVE_S
        assert c.timeout_s >= needed, c
        carried = sum(60 * MiB if "part-" in p else 64 * 1024 for p in c.carry)  # a part, a manifest
        assert carried < 64 * MiB
    receives = [c for c in calls if "receive" in c.command]
    assert [c.carry[0] for c in receives] == [f"out/gpu-bundle/part-{i:02d}" for i in range(3)]
    assert "install" in receives[-1].command and "suite e2e" in receives[-1].command


def test_device_prints_the_plan_and_its_budget():
    proc = subprocess.run([sys.executable, "gpu/device.py", "--plan"], capture_output=True, text=True,
                          cwd=ROOT, env=clean_env(), timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "1. tier 1, tier1: run(command='python3 gpu/device.py tier1', timeout_s=" in out
    assert "the same call once more" in out
    total = plan.budget(plan.calls(plan.bundle_parts()[0]))["total_s"]
    assert f"= {total} s of 900 s" in out


# ------------------------------------------------------------------------------ tier 1's imports

TIER1_FILES = (
    "gpu/device.py", "gpu/bundle.py", "gpu/suite.py", "gpu/plan.py", "gpu/trace_primitive.py",
    "gpu/trace_overlap.py", "benchmarks/pairs.py", "benchmarks/model_shapes.py",
)
LOCAL = {os.path.splitext(os.path.basename(f))[0] for f in TIER1_FILES}


def _optional(node, parents) -> bool:
    """Inside ``try: ... except ImportError`` or ``if TYPE_CHECKING:``: not needed to run."""
    for p in parents:
        if isinstance(p, ast.Try) and any(
            isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError") for h in p.handlers
        ):
            return True
        if isinstance(p, ast.If) and isinstance(p.test, ast.Name) and p.test.id == "TYPE_CHECKING":
            return True
    return False


def imports_of(path: str) -> set[str]:
    tree = ast.parse(open(path, encoding="utf-8").read())
    found = set()

    def visit(node, parents):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and not _optional(node, parents):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif node.level == 0:
                found.add(node.module)
        for child in ast.iter_child_nodes(node):
            visit(child, [*parents, node])

    visit(tree, [])
    return found


def test_everything_tier_1_runs_imports_only_torch_the_standard_library_and_the_project():
    allowed_top = set(sys.stdlib_module_names) | {"torch", "vllm_overlap"} | LOCAL
    todo = [os.path.join(ROOT, f) for f in TIER1_FILES]
    seen, outside = set(), {}
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imports_of(path):
            top = name.split(".")[0]
            if top not in allowed_top:
                outside.setdefault(name, []).append(os.path.relpath(path, ROOT))
            if top == "vllm_overlap":  # follow the project's own modules
                base = os.path.join(ROOT, *name.split("."))
                todo += [p for p in (base + ".py", os.path.join(base, "__init__.py")) if os.path.exists(p)]
    assert outside == {}
    assert os.path.join(ROOT, "vllm_overlap", "runtime", "streams.py") in seen  # the primitive is followed


BLOCKER = """
import runpy, sys
for name in ("vllm", "pydantic", "yaml", "transformers", "matplotlib", "pytest"):
    sys.modules[name] = None  # import raises ModuleNotFoundError; find_spec answers None
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as exc:
    code = exc.code
else:
    code = 0
loaded = sorted(m for m, v in sys.modules.items() if v is not None and m.split(".")[0] in {"vllm", "pydantic", "yaml"})
print("LOADED", loaded)
sys.exit(code)
"""


def _blocked(*argv, tmp_path):
    return subprocess.run([sys.executable, "-c", BLOCKER, *argv], capture_output=True, text=True, cwd=ROOT,
                          env=clean_env(), timeout=300)


def test_tier_1_entry_points_run_with_vllm_and_pydantic_unimportable(tmp_path):
    plan_run = _blocked("gpu/device.py", "--plan", tmp_path=tmp_path)
    assert plan_run.returncode == 0 and "LOADED []" in plan_run.stdout, plan_run.stdout + plan_run.stderr
    dry = _blocked("gpu/suite.py", "--tier", "1", "--dry-run", "--out", str(tmp_path / "suite"), tmp_path=tmp_path)
    assert "LOADED []" in dry.stdout, dry.stdout + dry.stderr
    assert "pairs " in dry.stdout and "trace_primitive " in dry.stdout
    assert "MISSING python module pytest, python module yaml, python module pydantic" in dry.stdout
    # pairs.py imports torch, its shape table and the primitive before it parses its arguments
    pairs = _blocked("benchmarks/pairs.py", "--help", tmp_path=tmp_path)
    assert pairs.returncode == 0 and "LOADED []" in pairs.stdout, pairs.stdout + pairs.stderr
    # trace_primitive imports everything it uses, then says it needs a GPU (this machine has none)
    trace = _blocked("gpu/trace_primitive.py", "--out", str(tmp_path / "trace"), tmp_path=tmp_path)
    assert trace.returncode == 2 and "needs a CUDA GPU" in trace.stderr, trace.stdout + trace.stderr
    assert "LOADED []" in trace.stdout


def test_the_cuda_tests_of_tier_1_need_no_vllm():
    """The tier-1 test files import no vLLM at module level (the step lists pytest, PyYAML and
    pydantic as its needs, and is skipped with the reason where the image lacks them)."""
    step = suite.STEPS["cuda_tests_torch"]
    assert "vllm" not in step.modules
    for path in suite.CUDA_TESTS_TORCH:
        tree = ast.parse(open(os.path.join(ROOT, path), encoding="utf-8").read())
        top_level = {a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names}
        top_level |= {n.module for n in tree.body if isinstance(n, ast.ImportFrom) and n.module}
        assert not {m for m in top_level if m.split(".")[0] == "vllm"}, path


def test_the_gpu_page_shows_the_plan_as_printed():
    printed = plan.render(plan.calls(["part-00", "part-01", "part-02"]), known=True).splitlines()
    page = open(os.path.join(ROOT, "docs", "gpu.md"), encoding="utf-8").read()
    for line in printed:
        if line[:2] in ("1.", "2.", "3.", "4.", "5.") or line.startswith("Budget:"):
            assert line in page, line
