"""Pack real vLLM for the lent GPU machine, in parts one device call can carry. Runs on the CPU machine.

    python gpu/bundle.py                       # download (cached), strip, pack, verify, print the calls
    python gpu/bundle.py --image-freeze F.txt  # also leave out what the image has (its pip freeze,
                                               # as `python3 gpu/device.py probe` writes it)

The GPU image has Python 3.12, torch 2.11.0+cu130, triton and transformers 5.17, no vLLM and no
network; a device call carries at most 64 MiB. vLLM 0.26.0 pins torch 2.11.0 and is built for
CUDA 13, so its wheel is the one (``--vllm``). Steps:

1. ``pip download --no-deps`` the vLLM wheel and every line of ``gpu/requirements-device.txt``
   for CPython 3.12 / manylinux x86-64, into a cache outside the repository. A specifier the
   registry cannot meet is met by the newest release it has, and the manifest says so.
2. Strip the vLLM wheel of what a Hopper GPU running this suite never loads (``STRIP``, each
   with the line of vLLM's source that shows it), and its RECORD lines.
3. Pack everything into one uncompressed, reproducible tar (wheels are compressed already),
   split it into parts of at most ``--part-mib`` MiB under ``out/gpu-bundle/`` (git-ignored),
   and write ``manifest.json``: sha256 of the tar, of each part and of each wheel, and which
   dependency satisfies which specifier.
4. Reassemble the parts into a second tar and check it is the same bytes, and that every wheel
   in it has its manifest sha256.
5. Print the session's plan (``gpu/plan.py``, also ``python gpu/device.py --plan``): tier 1
   (no bundle) first, then one call per part (``python3 gpu/device.py receive``), the last
   part's call installing and running ``e2e``, then ``decode_qwen3_next``, with the budget. A
   gap of more than 30 s between two calls loses the machine and everything on it.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VLLM_VERSION = "0.26.0"
PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
PART_MIB = 60
OUT = os.path.join(ROOT, "out", "gpu-bundle")

# Files of the vLLM wheel that this suite on a Hopper GPU never loads, and why.
STRIP = {
    "vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so": (
        "FlashAttention-2 (124 MiB compressed): on SM90 fa_utils.get_flash_attn_version picks "
        "FA3, and vllm_flash_attn/flash_attn_interface.py imports _vllm_fa2_C in a try"
    ),
    "vllm/vllm-rs": ("the Rust front-end binary: envs.py looks for it only with VLLM_USE_RUST_FRONTEND=1"),
}
STRIP_PATTERNS = {
    r"vllm/third_party/deep_gemm/_C\.cpython-3(10|11|13|14)-x86_64-linux-gnu\.so": (
        "DeepGEMM built for other Pythons: the image runs CPython 3.12"
    ),
    r"vllm/third_party/fmha_sm100/.*": (
        "Blackwell (SM100) attention sources for JIT: only MiniMax M3's indexer imports them, "
        "lazily, on SM100 (models/minimax_m3/common/indexer.py)"
    ),
}


def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "vllm-overlap", "gpu-bundle", "wheels")


def requirements(path: str) -> list[str]:
    """The specifiers of a requirements file (comments and blank lines dropped)."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.split("#", 1)[0].strip()
            if line:
                out.append(line)
    return out


def dist_name(spec_or_file: str) -> str:
    """The normalised distribution name of a specifier or a wheel file name."""
    base = os.path.basename(spec_or_file)
    name = base.split("-")[0] if base.endswith(".whl") else re.split(r"[<>=!~ ;\[]", base, maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def _pip_download(spec: str, dest: str) -> subprocess.CompletedProcess:
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            PYTHON,
            "--implementation",
            "cp",
            *platforms,
            "-d",
            dest,
            spec,
        ],
        capture_output=True,
        text=True,
    )


def download(spec: str, dest: str) -> tuple[str, str]:
    """The wheel for ``spec`` in ``dest`` (downloaded unless there); (path, note). A
    specifier the registry cannot meet falls back to the newest release of the project."""
    os.makedirs(dest, exist_ok=True)
    name = dist_name(spec)
    note = ""
    proc = _pip_download(spec, dest)
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or ["?"])[-1]
        proc = _pip_download(name, dest)
        if proc.returncode != 0:
            raise SystemExit(f"bundle: cannot download {spec}: {reason}")
        note = f"wanted {spec}, which the registry lacks for CPython {PYTHON}"
    match = re.search(r"(?:File was already downloaded|Saved) (\S+\.whl)", proc.stdout)
    if match:
        path = os.path.join(dest, os.path.basename(match.group(1)))
    else:  # pip's wording changed: the newest file of this project here
        mine = [os.path.join(dest, f) for f in os.listdir(dest) if f.endswith(".whl") and dist_name(f) == name]
        path = max(mine, key=os.path.getmtime)
    if note:
        note += f"; shipping {os.path.basename(path).split('-')[1]}"
    return path, note


def strip_wheel(src: str, dst: str) -> list[dict]:
    """Copy the wheel ``src`` to ``dst`` without the ``STRIP`` files (RECORD updated); per
    reason, the files removed and their uncompressed bytes."""
    removed = []
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        names = zin.namelist()
        drop = {}
        for name in names:
            why = STRIP.get(name) or next((w for p, w in STRIP_PATTERNS.items() if re.fullmatch(p, name)), None)
            if why:
                drop[name] = why
        for info in zin.infolist():
            if info.filename in drop:
                removed.append({"file": info.filename, "bytes": info.file_size, "why": drop[info.filename]})
                continue
            data = zin.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(ln for ln in lines if ln.split(",", 1)[0] not in drop).encode()
            zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    by_reason: dict[str, dict] = {}
    for r in removed:
        entry = by_reason.setdefault(r["why"], {"why": r["why"], "files": 0, "bytes": 0, "first": r["file"]})
        entry["files"] += 1
        entry["bytes"] += r["bytes"]
    return list(by_reason.values())


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def make_tar(files: list[str], tar_path: str, extra: dict[str, bytes]) -> None:
    """A reproducible tar: sorted members under ``wheels/``, mtime 0, owner root."""

    def clean(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "root", "root"
        return info

    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in sorted(extra.items()):
            info = clean(tarfile.TarInfo(name))
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for path in sorted(files, key=os.path.basename):
            tar.add(path, arcname=f"wheels/{os.path.basename(path)}", filter=clean)


def split(path: str, out_dir: str, part_bytes: int) -> list[dict]:
    """Cut ``path`` into ``part-NN`` files of at most ``part_bytes``; their names and sha256."""
    parts = []
    with open(path, "rb") as fh:
        index = 0
        while True:
            data = fh.read(part_bytes)
            if not data:
                break
            name = f"part-{index:02d}"
            with open(os.path.join(out_dir, name), "wb") as part:
                part.write(data)
            parts.append({"name": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
            index += 1
    return parts


def reassemble(parts_dir: str, parts: list[dict], dest: str) -> str:
    """Concatenate the parts in order into ``dest``, checking each part; the tar's sha256."""
    digest = hashlib.sha256()
    with open(dest, "wb") as out:
        for part in parts:
            with open(os.path.join(parts_dir, part["name"]), "rb") as fh:
                data = fh.read()
            if hashlib.sha256(data).hexdigest() != part["sha256"]:
                raise ValueError(f"{part['name']} is not the part the manifest names (sha256 differs)")
            out.write(data)
            digest.update(data)
    return digest.hexdigest()


def verify(out_dir: str, manifest: dict) -> str:
    """Reassemble the parts in a scratch directory; check the tar and every wheel in it."""
    with tempfile.TemporaryDirectory() as scratch:
        tar_path = os.path.join(scratch, "bundle.tar")
        got = reassemble(out_dir, manifest["parts"], tar_path)
        if got != manifest["tar_sha256"]:
            raise ValueError("the parts do not reassemble into the tar (sha256 differs)")
        with tarfile.open(tar_path) as tar:
            for wheel in manifest["wheels"]:
                data = tar.extractfile(f"wheels/{wheel['file']}").read()
                if hashlib.sha256(data).hexdigest() != wheel["sha256"]:
                    raise ValueError(f"{wheel['file']} differs from the manifest after reassembly")
    return (
        f"{len(manifest['parts'])} parts reassemble bit for bit into the tar (sha256 {got[:16]}...), "
        f"{len(manifest['wheels'])} wheels checked"
    )


def pack(files: list[dict], out_dir: str, part_bytes: int, meta: dict) -> dict:
    """Tar ``files`` (dicts with at least ``path``), split it, write manifest.json."""
    os.makedirs(out_dir, exist_ok=True)
    for old in glob.glob(os.path.join(out_dir, "part-*")):
        os.remove(old)
    wheels = []
    for f in files:
        entry = {k: v for k, v in f.items() if k != "path"}
        entry.update(file=os.path.basename(f["path"]), sha256=sha256_file(f["path"]), bytes=os.path.getsize(f["path"]))
        wheels.append(entry)
    inner = json.dumps({"wheels": wheels}, indent=1, sort_keys=True).encode()
    with tempfile.TemporaryDirectory() as scratch:
        tar_path = os.path.join(scratch, "bundle.tar")
        make_tar([f["path"] for f in files], tar_path, {"wheels.json": inner})
        tar_sha = sha256_file(tar_path)
        parts = split(tar_path, out_dir, part_bytes)
    manifest = {
        **meta,
        "tar_sha256": tar_sha,
        "tar_bytes": sum(p["bytes"] for p in parts),
        "parts": parts,
        "wheels": wheels,
    }
    with open(os.path.join(out_dir, "manifest.json"), "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=1)
    return manifest


def device_calls(manifest: dict) -> list[dict]:
    """The session's device calls for this bundle, in order (``gpu/plan.py``): arguments of ``run``."""
    from plan import calls

    return [
        {"command": c.command, "carry": list(c.carry), "timeout_s": c.timeout_s}
        for c in calls([p["name"] for p in manifest["parts"]])
    ]


def image_has(freeze_path: str | None) -> dict[str, str]:
    """{distribution: version} of a ``pip freeze`` (the image's, from device.py probe)."""
    if not freeze_path:
        return {}
    found = {}
    with open(freeze_path, encoding="utf-8") as fh:
        for line in fh:
            if "==" in line:
                name, version = line.strip().split("==", 1)
                found[dist_name(name)] = version
    return found


def satisfied(spec: str, version: str | None) -> bool:
    """Whether an installed ``version`` (None: absent) meets ``spec``."""
    if version is None:
        return False
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pragma: no cover - pip always carries it
        from pip._vendor.packaging.requirements import Requirement
    return Requirement(spec).specifier.contains(version, prereleases=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vllm", default=VLLM_VERSION)
    parser.add_argument("--requirements", default=os.path.join(HERE, "requirements-device.txt"))
    parser.add_argument("--image-freeze", default=None, help="the image's pip freeze (device.py probe)")
    parser.add_argument("--part-mib", type=int, default=PART_MIB)
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args(argv)
    cache = cache_dir()
    image = image_has(args.image_freeze)

    vllm_wheel, _ = download(f"vllm=={args.vllm}", cache)
    stripped_path = os.path.join(cache, "stripped", os.path.basename(vllm_wheel))
    os.makedirs(os.path.dirname(stripped_path), exist_ok=True)
    removed = strip_wheel(vllm_wheel, stripped_path)
    files = [{"path": stripped_path, "dist": "vllm", "spec": f"vllm=={args.vllm}", "role": "vllm"}]
    left_out = []
    for spec in requirements(args.requirements):
        name = dist_name(spec)
        if satisfied(spec, image.get(name)):
            left_out.append(f"{spec}: the image has {image[name]}")
            continue
        path, note = download(spec, cache)
        files.append({"path": path, "dist": name, "spec": spec, "role": "dependency", "note": note})

    meta = {
        "vllm": args.vllm,
        "python": PYTHON,
        "platforms": list(PLATFORMS),
        "stripped": removed,
        "left_out_image_has": left_out,
        "part_bytes": args.part_mib * 2**20,
    }
    manifest = pack(files, args.out, args.part_mib * 2**20, meta)
    print(
        f"vllm {args.vllm}: {os.path.getsize(vllm_wheel) / 2**20:.1f} MiB, stripped "
        f"{os.path.getsize(stripped_path) / 2**20:.1f} MiB (removed {sum(r['files'] for r in removed)} files, "
        f"{sum(r['bytes'] for r in removed) / 2**20:.0f} MiB uncompressed)"
    )
    for wheel in manifest["wheels"][1:]:
        print(f"  {wheel['file']:70s} {wheel['bytes'] / 2**20:6.2f} MiB  {wheel.get('note', '')}".rstrip())
    for line in left_out:
        print(f"  left out ({line})")
    print(f"bundle: {manifest['tar_bytes'] / 2**20:.1f} MiB in {len(manifest['parts'])} parts under {args.out}")
    print(verify(args.out, manifest))
    import plan

    print()
    print(plan.render(plan.calls([p["name"] for p in manifest["parts"]]), known=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
