"""gpu/bundle.py and gpu/device.py without a GPU: strip, pack, split, reassemble, receive, unpack.

Synthetic wheels stand in for vLLM's (the real bundle is built by ``python gpu/bundle.py``,
which downloads ~290 MiB; its output is in the closing notes, not in CI).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import zipfile

import pytest
from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "gpu"))

import bundle  # noqa: E402
import device  # noqa: E402


def fake_wheel(path, files: dict[str, bytes]) -> str:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        record = []
        for name, data in files.items():
            zf.writestr(name, data)
            record.append(f"{name},sha256=x,{len(data)}\n")
        zf.writestr("pkg-1.0.dist-info/RECORD", "".join(record))
    return str(path)


@pytest.mark.parametrize("size, part, parts", [(10, 4, 3), (12, 4, 3), (3, 4, 1), (0, 4, 0)])
def test_split_then_reassemble_is_bit_for_bit(tmp_path, size, part, parts):
    data = os.urandom(size)
    src = tmp_path / "blob"
    src.write_bytes(data)
    out = tmp_path / "parts"
    out.mkdir()
    made = bundle.split(str(src), str(out), part)
    assert len(made) == parts and all(p["bytes"] <= part for p in made)
    assert sum(p["bytes"] for p in made) == size
    got = bundle.reassemble(str(out), made, str(tmp_path / "again"))
    assert (tmp_path / "again").read_bytes() == data
    assert got == hashlib.sha256(data).hexdigest()


def test_a_damaged_part_is_named(tmp_path):
    src = tmp_path / "blob"
    src.write_bytes(os.urandom(9))
    made = bundle.split(str(src), str(tmp_path), 4)
    part1 = tmp_path / made[1]["name"]
    part1.write_bytes(b"\x00" + part1.read_bytes()[1:])
    with pytest.raises(ValueError, match="part-01 is not the part the manifest names"):
        bundle.reassemble(str(tmp_path), made, str(tmp_path / "again"))


def test_strip_wheel_drops_the_listed_files_and_their_record_lines(tmp_path):
    src = fake_wheel(
        tmp_path / "vllm-0.0-x.whl",
        {
            "vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so": b"fa2" * 100,
            "vllm/vllm_flash_attn/_vllm_fa3_C.abi3.so": b"fa3",
            "vllm/third_party/deep_gemm/_C.cpython-311-x86_64-linux-gnu.so": b"dg311",
            "vllm/third_party/deep_gemm/_C.cpython-312-x86_64-linux-gnu.so": b"dg312",
            "vllm/third_party/fmha_sm100/jit.py": b"x",
            "vllm/__init__.py": b"",
        },
    )
    dst = str(tmp_path / "stripped.whl")
    removed = bundle.strip_wheel(src, dst)
    kept = set(zipfile.ZipFile(dst).namelist())
    assert kept == {
        "vllm/vllm_flash_attn/_vllm_fa3_C.abi3.so",
        "vllm/third_party/deep_gemm/_C.cpython-312-x86_64-linux-gnu.so",
        "vllm/__init__.py",
        "pkg-1.0.dist-info/RECORD",
    }
    record = zipfile.ZipFile(dst).read("pkg-1.0.dist-info/RECORD").decode()
    assert "fa2" not in record and "fmha_sm100" not in record and "_vllm_fa3_C" in record
    assert sum(r["files"] for r in removed) == 3 and sum(r["bytes"] for r in removed) == 300 + 5 + 1


def _bundle(tmp_path, part_bytes=1000):
    """vLLM, a dependency nothing here has, and one this environment has (pytest)."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    vllm = fake_wheel(wheels / "vllm-9.9.9-cp38-abi3-linux_x86_64.whl", {"vllm/__init__.py": os.urandom(2500)})
    dep = fake_wheel(wheels / "tiny_dep-1.0-py3-none-any.whl", {"tiny_dep/__init__.py": b"x = 1\n"})
    present = fake_wheel(wheels / "pytest-99.0-py3-none-any.whl", {"pytest/__init__.py": b""})
    files = [
        {"path": vllm, "dist": "vllm", "spec": "vllm==9.9.9", "role": "vllm"},
        {"path": dep, "dist": "tiny-dep", "spec": "tiny-dep>=1", "role": "dependency"},
        {"path": present, "dist": "pytest", "spec": "pytest>=1", "role": "dependency"},
    ]
    out = tmp_path / "out"
    manifest = bundle.pack(files, str(out), part_bytes, {"vllm": "9.9.9"})
    return out, manifest


def test_pack_writes_parts_a_manifest_and_verifies(tmp_path):
    out, manifest = _bundle(tmp_path)
    assert len(manifest["parts"]) >= 3 and all(p["bytes"] <= 1000 for p in manifest["parts"])
    assert sorted(os.listdir(out)) == ["manifest.json", *[p["name"] for p in manifest["parts"]]]
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert "reassemble bit for bit" in bundle.verify(str(out), manifest)
    (out / "part-00").write_bytes(b"!" + (out / "part-00").read_bytes()[1:])
    with pytest.raises(ValueError, match="part-00"):
        bundle.verify(str(out), manifest)


def test_device_calls_carry_one_part_each_within_the_limit(tmp_path):
    out, manifest = _bundle(tmp_path)
    calls = bundle.device_calls(manifest)
    assert calls[0] == {"command": "python3 gpu/device.py tier1", "carry": [], "timeout_s": calls[0]["timeout_s"]}
    receives = [c for c in calls if "receive" in c["command"]]
    assert len(receives) == len(manifest["parts"])
    assert [c["carry"][0] for c in receives] == [f"out/gpu-bundle/{p['name']}" for p in manifest["parts"]]
    assert "device.py install" in receives[-1]["command"] and "suite e2e" in receives[-1]["command"]
    assert all(c["timeout_s"] <= 600 for c in calls)
    assert bundle.PART_MIB * 2**20 + os.path.getsize(out / "manifest.json") < 64 * 2**20
    assert calls[-1]["command"] == "python3 gpu/device.py suite decode_qwen3_next"


def test_device_receives_parts_and_unpacks_what_the_image_lacks(tmp_path, monkeypatch):
    out, manifest = _bundle(tmp_path)
    store = tmp_path / "store"
    monkeypatch.setattr(device, "STORE", str(store))
    monkeypatch.setattr(device, "MANIFEST", str(out / "manifest.json"))
    for part in manifest["parts"]:
        assert device.cmd_receive([str(out / part["name"])]) == 0
    chosen, kept = device.unpack(manifest)
    # vllm always; tiny-dep because nothing provides it; pytest is in this environment already
    assert [os.path.basename(c) for c in chosen] == [
        "vllm-9.9.9-cp38-abi3-linux_x86_64.whl",
        "tiny_dep-1.0-py3-none-any.whl",
    ]
    assert len(kept) == 1 and kept[0].startswith("pytest ") and kept[0].endswith("(image)")
    assert all(os.path.exists(c) for c in chosen)


def test_device_refuses_a_damaged_part_and_a_missing_one(tmp_path, monkeypatch, capsys):
    out, manifest = _bundle(tmp_path)
    monkeypatch.setattr(device, "STORE", str(tmp_path / "store"))
    monkeypatch.setattr(device, "MANIFEST", str(out / "manifest.json"))
    damaged = out / "part-01"
    damaged.write_bytes(b"?" + damaged.read_bytes()[1:])
    assert device.cmd_receive([str(damaged)]) == 1
    assert "part-01 arrived damaged" in capsys.readouterr().err
    assert device.cmd_receive([str(out / "part-00")]) == 0
    with pytest.raises(RuntimeError, match="parts missing"):
        device.unpack(manifest)


def test_requirements_file_parses_and_names_distributions():
    specs = bundle.requirements(os.path.join(ROOT, "gpu", "requirements-device.txt"))
    names = [bundle.dist_name(s) for s in specs]
    assert "wrapt" in names and "fastapi" in names and len(names) == len(set(names))
    assert not any(n.startswith(("torch", "nvidia", "triton", "vllm")) for n in names)
    assert bundle.dist_name("prometheus_client>=0.18.0") == "prometheus-client"
    assert bundle.dist_name("pydantic_core-2.50.4-cp312-cp312-manylinux2014_x86_64.whl") == "pydantic-core"
    assert bundle.satisfied("fastapi>=0.133.0,<0.137.0", "0.136.3")
    assert not bundle.satisfied("fastapi>=0.133.0,<0.137.0", "0.165.0")
    assert not bundle.satisfied("wrapt>=1.14", None)


def test_the_gpu_page_states_each_steps_limit():
    import suite

    page = open(os.path.join(ROOT, "docs", "gpu.md"), encoding="utf-8").read()
    for step in suite.STEPS.values():
        row = next(ln for ln in page.splitlines() if ln.startswith("|") and f"`{step.name}`" in ln)
        limit = row.rstrip()
        assert limit.endswith(f"| {step.limit_s} s |") or limit.endswith(f"| {step.limit_s} s each |"), row
