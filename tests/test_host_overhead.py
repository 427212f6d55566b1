"""The host-overhead benchmark's smoke run: it completes, prints its table last, writes its
JSON, and every path's result equals upstream's statements bit for bit.

Timings are printed, never asserted (speed is measured in the benchmark, not in tests).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import clean_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLUMNS = ["site", "path", "calls", "off_us", "on_us", "added_us", "p10_us", "p90_us", "target_us", "within",
           "identical"]


def test_host_overhead_smoke(tmp_path):
    proc = subprocess.run(
        [sys.executable, "benchmarks/host_overhead.py", "--smoke", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=clean_env(), cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads((tmp_path / "host_overhead-smoke.json").read_text())
    assert data["tokens"] == 1 and data["not_measured"] == {}
    assert set(data["targets_us"]) == {"serial fallback", "op path", "op dispatch"}
    rows = data["rows"]
    # gdn_in_proj is an op site (its op dispatched too), delta_in_proj_kimi_gdn a plain one
    expected = [
        ("gdn_in_proj", "off vs off"), ("gdn_in_proj", "serial fallback"), ("gdn_in_proj", "op path"),
        ("gdn_in_proj", "op dispatch"),
        ("delta_in_proj_kimi_gdn", "off vs off"), ("delta_in_proj_kimi_gdn", "serial fallback"),
        ("delta_in_proj_kimi_gdn", "op path"),
    ]
    assert [(r["site"], r["path"]) for r in rows] == expected
    for r in rows:
        assert list(r) == COLUMNS
        assert r["calls"] == data["calls"] * (1 if r["path"] != "off vs off" else 3 if r["site"] == "gdn_in_proj" else 2)
        assert r["p10_us"] <= r["added_us"] <= r["p90_us"]
        if r["path"] == "off vs off":
            assert r["identical"] is None and r["target_us"] is None and r["within"] is None
        else:  # the rewritten code's result is upstream's, bit for bit, on every path
            assert r["identical"] is True
            assert r["target_us"] == data["targets_us"][r["path"]] and isinstance(r["within"], bool)
    lines = proc.stdout.rstrip().splitlines()
    header = lines[-len(rows) - 2].split()
    assert header == COLUMNS and set(lines[-len(rows) - 1]) == {"-", " "}  # the table is last
    assert [tuple(line.split()[:2]) for line in lines[-len(rows):]] == [
        (site, path.split()[0]) for site, path in expected
    ]
    table = (tmp_path / "host_overhead-smoke.txt").read_text().rstrip().splitlines()
    assert table[-len(rows) - 2:] == lines[-len(rows) - 2:]
    print("\n" + "\n".join(lines[-len(rows) - 3:]))
