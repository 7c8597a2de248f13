#!/usr/bin/env python
"""Make sure the running Python environment has a working detectron2.

Detectron2 is not published on the package registry, so ``pip install`` cannot
resolve it. This script picks the first route that works:

1. ``existing``: a detectron2 that is already importable is used as it is;
   nothing of that environment is touched.
2. ``source``: the official route, ``pip install`` from the detectron2 git
   repository (needs the network to reach it; compiles the C++ ops).
3. ``registry``: the ``sal-detectron2==0.7.2`` wheel from the registry, which is
   upstream detectron2 (main of 2024-04-17) with two small fixes, shipped only as
   a cp310 wheel with a CUDA ``_C`` extension. It is downloaded, checked against
   a pinned sha256, re-packed without the compiled ``_C`` module and without its
   stray top-level ``tools`` package, re-tagged ``py3-none-any`` and installed.
   Detectron2 runs without ``_C``; what is lost is rotated-box ops, DeformConv
   and the C++ COCOeval (pycocotools is used instead). diffseg_d2 uses none of
   them.

Usage::

    python tools/install_detectron2.py               # auto: existing, source, registry
    python tools/install_detectron2.py --route registry
"""
from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import importlib.util
import io
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

OFFICIAL_REPO = "https://github.com/facebookresearch/detectron2.git"
REGISTRY_NAME = "sal-detectron2"
REGISTRY_VERSION = "0.7.2"
REGISTRY_WHEEL = "sal_detectron2-0.7.2-cp310-none-any.whl"
REGISTRY_SHA256 = "491af0c7f79bdb2d178e46f6cb16a97c4ac968d45c41ea3f6b6435d59bbee561"
# What detectron2 needs at run time that the registry wheel does not declare, and
# the bounds it needs: its SemSegEvaluator fails on numpy 2, model_zoo imports
# pkg_resources (gone from setuptools 81).
RUNTIME_REQUIREMENTS = [
    "fvcore>=0.1.5",
    "iopath>=0.1.7",
    "numpy>=1.23,<2",
    "setuptools<81",
    "pycocotools>=2.0.2",
    "panopticapi-lite>=0.1",
]


def log(msg: str) -> None:
    print(f"[install_detectron2] {msg}", flush=True)


def pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    log(" ".join(cmd))
    subprocess.check_call(cmd)


def existing_detectron2() -> str | None:
    """Location of an importable detectron2, or None."""
    spec = importlib.util.find_spec("detectron2")
    if spec is None or not spec.origin:
        return None
    return os.path.dirname(spec.origin)


def source_reachable(timeout: float) -> bool:
    if shutil.which("git") is None:
        return False
    try:
        subprocess.run(
            ["git", "ls-remote", "--exit-code", OFFICIAL_REPO, "HEAD"],
            check=True,
            capture_output=True,
            timeout=timeout,
        )
        return True
    except (subprocess.SubprocessError, OSError):
        return False


def install_from_source() -> None:
    # torch must already be importable: detectron2's setup.py imports it, so the
    # build runs without isolation.
    pip("install", "--no-build-isolation", f"git+{OFFICIAL_REPO}")
    pip("install", *RUNTIME_REQUIREMENTS)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def repack_registry_wheel(src: str, dst_dir: str) -> str:
    """Write a pure-Python ``py3-none-any`` copy of the registry wheel.

    Returns the path of the new wheel. The RECORD is rewritten with the hashes
    of the files that remain, so pip verifies the new wheel as usual.
    """
    dist_info = f"sal_detectron2-{REGISTRY_VERSION}.dist-info"
    out_path = os.path.join(dst_dir, f"sal_detectron2-{REGISTRY_VERSION}-py3-none-any.whl")
    records = []
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out_path, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            name = info.filename
            base = os.path.basename(name)
            if name.startswith("tools/"):
                continue  # a stray top-level package that would shadow others named "tools"
            if name.startswith("detectron2/") and base.startswith("_C") and base.endswith(".so"):
                continue  # compiled against CUDA and cp310 only
            if name == f"{dist_info}/RECORD":
                continue
            data = zin.read(name)
            if name == f"{dist_info}/WHEEL":
                lines = []
                for line in data.decode().splitlines():
                    if line.startswith("Tag:"):
                        line = "Tag: py3-none-any"
                    elif line.startswith("Root-Is-Purelib:"):
                        line = "Root-Is-Purelib: true"
                    lines.append(line)
                data = ("\n".join(lines) + "\n").encode()
            if name == f"{dist_info}/top_level.txt":
                data = b"detectron2\n"
            zout.writestr(name, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            records.append((name, f"sha256={digest}", str(len(data))))
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerows(records)
        writer.writerow((f"{dist_info}/RECORD", "", ""))
        zout.writestr(f"{dist_info}/RECORD", buf.getvalue())
    return out_path


def install_from_registry() -> None:
    with tempfile.TemporaryDirectory(prefix="diffseg-d2-detectron2-") as tmp:
        pip(
            "download", "--no-deps", "--only-binary", ":all:", "--python-version", "3.10",
            "-d", tmp, f"{REGISTRY_NAME}=={REGISTRY_VERSION}",
        )
        src = os.path.join(tmp, REGISTRY_WHEEL)
        if not os.path.isfile(src):
            raise SystemExit(f"Expected {REGISTRY_WHEEL} from the registry, found {os.listdir(tmp)}.")
        with open(src, "rb") as f:
            digest = _sha256(f.read())
        if digest != REGISTRY_SHA256:
            raise SystemExit(
                f"Checksum mismatch for {REGISTRY_WHEEL}: got {digest}, expected {REGISTRY_SHA256}. "
                "Refusing to install it; install detectron2 yourself and re-run."
            )
        log(f"sha256 verified: {digest}")
        out_dir = os.path.join(tmp, "repacked")
        os.makedirs(out_dir)
        wheel = repack_registry_wheel(src, out_dir)
        pip("install", *RUNTIME_REQUIREMENTS, wheel)


def check_import() -> None:
    code = (
        "import detectron2, detectron2.config, detectron2.evaluation, detectron2.engine;"
        "print(detectron2.__version__, detectron2.__file__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"detectron2 was installed but does not import:\n{out.stderr}")
    log(f"detectron2 imports: {out.stdout.strip()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--route",
        choices=["auto", "existing", "source", "registry"],
        default=os.environ.get("DIFFSEG_D2_DETECTRON2_ROUTE", "auto"),
        help="auto tries existing, then source (if the repository answers), then registry",
    )
    parser.add_argument("--probe-timeout", type=float, default=15.0,
                        help="seconds to wait for the official repository to answer")
    args = parser.parse_args(argv)

    found = existing_detectron2()
    if found and args.route in ("auto", "existing"):
        log(f"using the detectron2 already installed at {found}; nothing changed")
        check_import()
        return 0
    if args.route == "existing":
        raise SystemExit("No detectron2 is installed in this environment (route 'existing').")

    if args.route == "source" or (args.route == "auto" and source_reachable(args.probe_timeout)):
        log("installing detectron2 from the official source repository")
        install_from_source()
    else:
        if args.route == "auto":
            log("the official repository is not reachable; using the registry route")
        install_from_registry()
    check_import()
    return 0


if __name__ == "__main__":
    sys.exit(main())
