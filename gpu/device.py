"""The steps run on the lent GPU machine (its own python3: torch 2.11, no vLLM, no network).

    python gpu/device.py --plan                 # (anywhere) the session's calls and their budget
    python3 gpu/device.py tier1                 # probe, then gpu/suite.py --tier 1 (torch only) -> $OUT
    python3 gpu/device.py probe                 # what the image has -> $OUT/probe/ (freeze, GPU)
    python3 gpu/device.py receive PART          # keep a bundle part where the next call sees it
    python3 gpu/device.py install               # probe, reassemble, check, install vLLM + this project
    python3 gpu/device.py suite [STEP ...]      # gpu/suite.py with the installed vLLM -> $OUT/suite
    python gpu/device.py collect FILES_AT --call NAME   # (here) a call's results -> benchmarks/results/

``tier1`` runs with the image's own python and torch: no bundle, nothing installed (its steps
import torch, the standard library and this repository only; the cuda tests also need pytest,
PyYAML and pydantic, and are skipped with the reason where the image lacks them).

The parts of ``gpu/bundle.py`` arrive one call each and are kept in ``STORE`` (outside the
repository copy, which a call may replace); files there survive only while the machine stays
warm (30 s after a call). ``install`` checks every part and the reassembled tar against
``manifest.json``, makes a virtual environment on top of the image's packages
(``--system-site-packages``: the image's torch is the one vLLM runs on), installs the stripped
vLLM wheel and each dependency the image does not already satisfy with ``--no-deps`` and no
index, then this project, and checks that ``import vllm`` loads the image's torch and that
doctor runs. Everything it says goes to $OUT (the folder the device tool brings back).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from bundle import reassemble, satisfied, sha256_file  # noqa: E402  (stdlib only)

STORE = os.environ.get("VLLM_OVERLAP_GPU_STORE", "/tmp/vllm-overlap-gpu")
VENV = os.path.join(STORE, "venv")
MANIFEST = os.path.join(ROOT, "out", "gpu-bundle", "manifest.json")


def out_dir(*parts: str) -> str:
    path = os.path.join(os.environ.get("OUT", os.path.join(ROOT, "out", "device")), *parts)
    os.makedirs(path, exist_ok=True)
    return path


def sh(argv: list[str], log, **kwargs) -> int:
    log.write(f"$ {' '.join(argv)}\n")
    log.flush()
    return subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, **kwargs).returncode


def load_manifest() -> dict:
    kept = os.path.join(STORE, "manifest.json")
    path = MANIFEST if os.path.exists(MANIFEST) else kept
    with open(path, encoding="utf-8") as fh:
        manifest = json.load(fh)
    if path != kept:
        os.makedirs(STORE, exist_ok=True)
        shutil.copyfile(path, kept)
    return manifest


def cmd_probe(args: list[str]) -> int:
    directory = out_dir("probe")
    with open(os.path.join(directory, "probe.txt"), "w", encoding="utf-8") as log:
        for argv in (
            [sys.executable, "--version"],
            [
                sys.executable,
                "-c",
                "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(), "
                "torch.cuda.get_device_capability())",
            ],
            ["nvidia-smi"],
            ["df", "-h", "/tmp", ROOT],
            ["free", "-g"],
            ["nproc"],
        ):
            sh(argv, log)
    with open(os.path.join(directory, "freeze.txt"), "w", encoding="utf-8") as fh:
        subprocess.run([sys.executable, "-m", "pip", "freeze", "--all"], stdout=fh, stderr=subprocess.STDOUT)
    print(open(os.path.join(directory, "probe.txt"), encoding="utf-8").read())
    return 0


def cmd_receive(args: list[str]) -> int:
    (part_path,) = args
    manifest = load_manifest()
    name = os.path.basename(part_path)
    expected = {p["name"]: p for p in manifest["parts"]}.get(name)
    if expected is None:
        print(f"receive: {name} is not a part of this bundle", file=sys.stderr)
        return 2
    got = sha256_file(part_path)
    if got != expected["sha256"]:
        print(
            f"receive: {name} arrived damaged (sha256 {got[:16]}, expected {expected['sha256'][:16]})", file=sys.stderr
        )
        return 1
    os.makedirs(os.path.join(STORE, "parts"), exist_ok=True)
    shutil.copyfile(part_path, os.path.join(STORE, "parts", name))
    have = sorted(os.listdir(os.path.join(STORE, "parts")))
    print(f"receive: {name} ok; {len(have)} of {len(manifest['parts'])} parts in {STORE}")
    return 0


def image_version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def unpack(manifest: dict) -> tuple[list[str], list[str]]:
    """Reassemble the received parts, check the tar and every wheel against the manifest,
    extract the wheels; (wheels to install, dependencies the image already satisfies)."""
    parts_dir = os.path.join(STORE, "parts")
    missing = [p["name"] for p in manifest["parts"] if not os.path.exists(os.path.join(parts_dir, p["name"]))]
    if missing:
        raise RuntimeError(f"parts missing: {missing} (the machine went cold, or a receive failed)")
    tar_path = os.path.join(STORE, "bundle.tar")
    if reassemble(parts_dir, manifest["parts"], tar_path) != manifest["tar_sha256"]:
        raise RuntimeError("the parts do not reassemble into the bundle")
    wheels_dir = os.path.join(STORE, "wheels")
    shutil.rmtree(wheels_dir, ignore_errors=True)
    with tarfile.open(tar_path) as tar:
        if hasattr(tarfile, "data_filter"):  # Python >= 3.12: refuse links and absolute paths
            tar.extractall(STORE, filter="data")
        else:
            tar.extractall(STORE)
    os.remove(tar_path)
    chosen, kept = [], []
    for wheel in manifest["wheels"]:
        path = os.path.join(wheels_dir, wheel["file"])
        if sha256_file(path) != wheel["sha256"]:
            raise RuntimeError(f"{wheel['file']} differs from the manifest")
        have = image_version(wheel["dist"]) if wheel["role"] == "dependency" else None
        if satisfied(wheel["spec"], have):
            kept.append(f"{wheel['dist']} {have} (image)")
        else:
            chosen.append(path)
    return chosen, kept


def cmd_install(args: list[str]) -> int:
    cmd_probe([])  # the image as found (its pip freeze refines the next bundle: --image-freeze)
    manifest = load_manifest()
    directory = out_dir("install")
    report = {"store": STORE}
    try:
        chosen, kept = unpack(manifest)
    except RuntimeError as exc:
        print(f"install: {exc}", file=sys.stderr)
        return 1
    report.update(installed=[os.path.basename(c) for c in chosen], kept_from_image=kept)
    log_path = os.path.join(directory, "install.log")
    with open(log_path, "w", encoding="utf-8") as log:
        if not os.path.exists(os.path.join(VENV, "bin", "python")):
            if sh([sys.executable, "-m", "venv", "--system-site-packages", VENV], log):
                print(f"install: venv failed, see {log_path}", file=sys.stderr)
                return 1
        py = os.path.join(VENV, "bin", "python")
        steps = [
            [py, "-m", "pip", "install", "--no-index", "--no-deps", "--quiet", *chosen],
            [py, "-m", "pip", "install", "--no-index", "--no-deps", "--no-build-isolation", "--quiet", ROOT],
        ]
        for argv in steps:
            if sh(argv, log):
                print(f"install: pip failed, see {log_path}", file=sys.stderr)
                return 1
        check = (
            "import json, torch, vllm, vllm_overlap; "
            "from vllm import LLM; "
            "print(json.dumps({'torch': torch.__version__, 'torch_file': torch.__file__, "
            "'cuda': torch.version.cuda, 'gpu': torch.cuda.get_device_name(), "
            "'vllm': vllm.__version__, 'vllm_file': vllm.__file__}))"
        )
        proc = subprocess.run([py, "-c", check], capture_output=True, text=True)
        log.write(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            report["import_check"] = proc.stderr.strip().splitlines()[-20:]
            _write(directory, report)
            print("install: import vllm failed:\n" + "\n".join(report["import_check"]), file=sys.stderr)
            return 1
        report["import_check"] = json.loads(proc.stdout.strip().splitlines()[-1])
        doctor = subprocess.run([os.path.join(VENV, "bin", "vllm-overlap"), "doctor"], capture_output=True, text=True)
        report["doctor_rc"] = doctor.returncode
        with open(os.path.join(directory, "doctor.txt"), "w", encoding="utf-8") as fh:
            fh.write(doctor.stdout + doctor.stderr)
    _write(directory, report)
    print(json.dumps(report["import_check"]))
    print(open(os.path.join(directory, "doctor.txt"), encoding="utf-8").read())
    return 0


def _write(directory: str, report: dict) -> None:
    with open(os.path.join(directory, "install.json"), "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=1)


def cmd_tier1(args: list[str]) -> int:
    """The image's torch only: probe, then the tier-1 steps of gpu/suite.py, with this python."""
    cmd_probe([])
    argv = [sys.executable, os.path.join(HERE, "suite.py"), "--out", out_dir("tier1"), "--tier", "1", *args]
    return subprocess.run(argv, cwd=ROOT).returncode


def cmd_collect(args: list[str]) -> int:
    """Copy one call's results (the device tool's files_at) under benchmarks/results/."""
    import argparse
    import time

    parser = argparse.ArgumentParser(prog="device.py collect")
    parser.add_argument("files_at", help="the folder the device tool put the call's $OUT files in")
    parser.add_argument("--call", required=True, help="the plan's call, e.g. tier1, e2e, decode")
    parser.add_argument("--into", default=None, help="default: benchmarks/results/gpu-<UTC date>")
    parser.add_argument("--max-mib", type=float, default=5.0, help="larger files are left out (named)")
    opts = parser.parse_args(args)
    into = opts.into or os.path.join(ROOT, "benchmarks", "results", time.strftime("gpu-%Y-%m-%d", time.gmtime()))
    dest = os.path.join(into, opts.call)
    copied, left = 0, []
    for base, _, files in os.walk(opts.files_at):
        for name in files:
            src = os.path.join(base, name)
            rel = os.path.relpath(src, opts.files_at)
            if os.path.getsize(src) > opts.max_mib * 2**20:
                left.append(f"{rel} ({os.path.getsize(src) / 2**20:.1f} MiB)")
                continue
            os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
            shutil.copyfile(src, os.path.join(dest, rel))
            copied += 1
    print(f"collect: {copied} files into {os.path.relpath(dest, ROOT)}")
    for line in left:
        print(f"  left out, over {opts.max_mib} MiB: {line}")
    return 0


def cmd_suite(args: list[str]) -> int:
    py = os.path.join(VENV, "bin", "python")
    if not os.path.exists(py):
        print("suite: nothing installed (run install first, within 30 s of the last call)", file=sys.stderr)
        return 1
    return subprocess.run([py, os.path.join(HERE, "suite.py"), "--out", out_dir("suite"), *args], cwd=ROOT).returncode


def cmd_plan(args: list[str]) -> int:
    import plan

    return plan.main()


COMMANDS = {
    "--plan": cmd_plan,
    "plan": cmd_plan,
    "tier1": cmd_tier1,
    "probe": cmd_probe,
    "receive": cmd_receive,
    "install": cmd_install,
    "suite": cmd_suite,
    "collect": cmd_collect,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(__doc__, file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
