"""The wheel set `gpu_check.py` needs on the GPU machine, built here, checked here, and sized.

The GPU machine reaches no package registry and takes at most 64 MiB of working tree and carried
files per call. Its image holds PyTorch and much of the scientific stack (`PREINSTALLED`, as
read from a machine running it on 2026-11-17) but not Ray, DeepSpeed or MLflow. This script:

  1. walks the requirements of what the check imports (`ROOTS`) for CPython 3.12 on Linux
     x86_64, skipping what the image holds, each pinned to the version installed here (the one
     the tests ran with);
  2. downloads each as a cp312 manylinux wheel, or builds one from its sdist where the registry
     has no wheel (DeepSpeed: a pure-Python wheel, its ops compiled on first use);
  3. trims Ray's wheel of `ray/jars/` (the Java workers' 31 MiB jar; Python-only Ray never
     loads it), rewriting its RECORD, and recompresses every wheel over 1 MiB with LZMA
     instead of deflate (pip unpacks wheels with the standard library's zipfile, which reads
     both; same files, same RECORD hashes, modes kept): 79 MiB of Ray alone becomes about 34;
  4. checks that the set resolves offline: every requirement of every carried wheel is met by a
     carried wheel or by the image (its version checked where the image's version is known),
     and pip itself accepts the set for Python 3.12 with no index
     (`pip install --dry-run --no-index --no-deps --only-binary=:all: --python-version 3.12`);
  5. prints each wheel's size, the total and what is left of the 64 MiB for the working tree.

    python benchmarks/gpu_wheels.py [--out .whl] [--json]
    python benchmarks/gpu_wheels.py --python 3.11 --rehearse DIR   # the carried-set rehearsal

--rehearse DIR then builds a fresh virtual environment holding only what the image holds (torch
and the image's packages the walk and ternarylm need, from this machine's registry), unpacks the
set into it the way the GPU machine will (no index, no dependencies, onto PYTHONPATH) and runs
`gpu_check.py --cpu-rehearsal --wheels` there, figures under DIR: every step but CUDA, with the
set exactly as carried. This machine has no Python 3.12 torch that runs without CUDA libraries,
so the rehearsal builds the set for the Python it runs with (--python 3.11 here); the 3.12 set
is checked by resolution only.

Then on the GPU machine (the `device` tool's `run`, carry [".whl", "gpu-data"]):
    python benchmarks/gpu_check.py --wheels .whl --data gpu-data/tinystories_sample.txt --json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path
from typing import NoReturn

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
CARRY_LIMIT = 64 * 2**20

# What `ternarylm train`, `pack` and the footprint measurement import on the GPU machine.
ROOTS = ["ray[train,tune]", "deepspeed", "mlflow-skinny", "sqlalchemy", "alembic", "datasets"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]
# ternarylm's own requirements that the image holds (the rehearsal installs them there).
IMAGE_NEEDS = ["torch", "numpy", "scipy", "pyarrow", "matplotlib", "psutil", "scikit-learn",
               "threadpoolctl", "pyyaml", "safetensors", "tokenizers", "transformers",
               "accelerate", "huggingface-hub"]


def environment(python: str) -> dict[str, str]:
    """Marker values of CPython `python` (3.12: the GPU machine's) on Linux x86_64."""
    return {"python_version": python, "python_full_version": f"{python}.3",
            "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
            "os_name": "posix", "implementation_name": "cpython",
            "platform_python_implementation": "CPython"}


def target(python: str) -> list[str]:
    """pip's options for wheels of CPython `python` on manylinux x86_64."""
    abi = "cp" + python.replace(".", "")
    return ["--python-version", python, "--implementation", "cp", "--abi", abi, "--abi", "abi3",
            "--abi", "none", *[a for p in PLATFORMS for a in ("--platform", p)]]

# The GPU machine's image (python3 3.12.3 at /opt/torch/.venv), as read on 2026-11-17.
PREINSTALLED = frozenset(canonicalize_name(n) for n in """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage
cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn
einops equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec
gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio
iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13
nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir
onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton
typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray
xxhash yarl zipp""".split())
# The image's versions that a session saw (pip list); the others are checked by name only.
PREINSTALLED_VERSIONS = {"accelerate": "1.15.0", "huggingface-hub": "1.33.0", "numpy": "2.5.2",
                         "safetensors": "0.8.0", "tokenizers": "0.23.2", "torch": "2.11.0",
                         "transformers": "5.17.0", "triton": "3.6.0"}
TRIM = {"ray": ("ray/jars/",)}  # wheel -> path prefixes left out
REPACK_OVER = 2**20  # wheels bigger than this are recompressed with LZMA


def fail(message: str) -> NoReturn:
    print(f"gpu_wheels: error: {message}", file=sys.stderr)
    sys.exit(2)


def local_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        fail(f"{name} is not installed in this environment, so there is no tested version to "
             f"carry; run `make setup` and use .venv/bin/python")


def fetch(name: str, version: str, out: Path, python: str) -> Path:
    """The manylinux wheel of name==version for CPython `python` in `out`: downloaded, or
    built from its sdist where the registry has no wheel."""
    pin = f"{name}=={version}"
    got = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                          "--only-binary=:all:", *target(python), "-d", str(out), pin],
                         capture_output=True, text=True)
    if got.returncode != 0:
        with tempfile.TemporaryDirectory() as d:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                            "--no-binary=:all:", "-d", d, pin], check=True, capture_output=True)
            sdist = next(Path(d).iterdir())
            # Built against this environment (DeepSpeed's setup imports torch); no ops compiled.
            subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                            "--no-build-isolation", "-w", str(out), str(sdist)], check=True,
                           capture_output=True)
    return wheel_of(name, out)


def wheel_of(name: str, folder: Path) -> Path:
    stem = canonicalize_name(name).replace("-", "_")
    for w in folder.glob("*.whl"):
        if canonicalize_name(w.name.split("-")[0]).replace("-", "_") == stem:
            return w
    fail(f"no wheel of {name} in {folder} after downloading it")


def requirements(wheel: Path, extras: set[str], python: str) -> list[Requirement]:
    """The wheel's Requires-Dist that apply on CPython `python` for these extras."""
    with zipfile.ZipFile(wheel) as z:
        meta_path = next(n for n in z.namelist()
                         if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
        text = z.read(meta_path).decode()
    out = []
    for line in text.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        marker: Marker | None = req.marker
        if marker is None or any(marker.evaluate({**environment(python), "extra": e})
                                 for e in (extras or {""})):
            out.append(req)
    return out


def repack(wheel: Path, leave_out: tuple[str, ...] = ()) -> int:
    """Rewrite the wheel with LZMA, without the files under `leave_out` (and their RECORD
    lines); every other file, its name, date and mode stay as they are. Returns the bytes
    saved."""
    before = wheel.stat().st_size
    tmp = wheel.with_suffix(".repacked")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w") as dst:
        for info in src.infolist():
            if leave_out and info.filename.startswith(leave_out):
                continue
            data = src.read(info)
            if leave_out and info.filename.endswith(".dist-info/RECORD"):
                data = "".join(line for line in data.decode().splitlines(keepends=True)
                               if not line.startswith(leave_out)).encode()
            info.compress_type = zipfile.ZIP_LZMA
            dst.writestr(info, data)
    tmp.replace(wheel)
    return before - wheel.stat().st_size


def build(out: Path, python: str) -> tuple[dict[str, dict], list[dict]]:
    """The set: name -> {version, wheel, bytes}; and every requirement edge with its check."""
    chosen: dict[str, dict] = {}
    edges: list[dict] = []
    queue = [(Requirement(r), "ternarylm") for r in ROOTS]
    seen_extras: dict[str, set[str]] = {}
    while queue:
        req, by = queue.pop(0)
        name = canonicalize_name(req.name)
        if name in PREINSTALLED:
            known = PREINSTALLED_VERSIONS.get(name)
            ok = None if known is None else Version(known) in req.specifier
            edges.append({"by": by, "needs": str(req), "met_by": f"image {known or '(version?)'}",
                          "ok": ok})
            continue
        if name not in chosen:
            version = local_version(name)
            chosen[name] = {"version": version, "wheel": fetch(name, version, out, python).name}
        edges.append({"by": by, "needs": str(req), "met_by": chosen[name]["version"],
                      "ok": Version(chosen[name]["version"]) in req.specifier})
        extras = set(req.extras)
        if name in seen_extras and extras <= seen_extras[name]:
            continue  # its requirements, for these extras, are walked already
        seen_extras[name] = seen_extras.get(name, set()) | extras
        for sub in requirements(out / chosen[name]["wheel"], seen_extras[name], python):
            queue.append((sub, f"{name}{sorted(extras) if extras else ''}"))
    for name, entry in chosen.items():
        wheel, leave_out = out / entry["wheel"], TRIM.get(name, ())
        if leave_out or wheel.stat().st_size > REPACK_OVER:
            entry["repacked"] = {"left_out": list(leave_out),
                                 "bytes_saved": repack(wheel, leave_out)}
        entry["bytes"] = wheel.stat().st_size
    return chosen, edges


def pip_resolves(out: Path, chosen: dict[str, dict], python: str) -> tuple[bool, str]:
    """pip's own check: the carried wheels install for CPython `python` with no index."""
    with tempfile.TemporaryDirectory() as d:
        got = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--no-deps",
             "--only-binary=:all:", *target(python), "--target", d, "--find-links", str(out),
             *[f"{n}=={e['version']}" for n, e in sorted(chosen.items())]],
            capture_output=True, text=True)
    text = (got.stdout + got.stderr).strip().splitlines()
    return got.returncode == 0, next((ln for ln in text if ln.startswith("Would install")),
                                     text[-1] if text else "")


def tree_bytes() -> int:
    """What the working tree sends with every call: the files git tracks."""
    names = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True,
                           check=True).stdout.decode().split("\0")
    return sum(p.stat().st_size for p in (REPO / n for n in names if n) if p.is_file())


def rehearse(out: Path, edges: list[dict], python: str, figures: Path) -> int:
    """gpu_check's CPU rehearsal in a fresh environment holding only the image's packages,
    with the set installed as the GPU machine installs it. Returns its exit status."""
    interpreter = shutil.which(f"python{python}")
    if interpreter is None:
        fail(f"no python{python} on PATH for the rehearsal; pass --python with one that is")
    image = sorted({Requirement(e["needs"]).name for e in edges if e["met_by"].startswith("image")}
                   | set(IMAGE_NEEDS) - {"torch"}) + [f"torch=={local_version('torch')}"]
    with tempfile.TemporaryDirectory() as d:
        venv = Path(d) / "image"
        subprocess.run([interpreter, "-m", "venv", str(venv)], check=True)
        py = str(venv / "bin" / "python")
        subprocess.run([py, "-m", "pip", "install", "-q", *image], check=True)
        figures.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        print(f"rehearsal: {len(image)} image packages in a fresh {python} environment; "
              f"gpu_check --cpu-rehearsal --wheels {out}", flush=True)
        return subprocess.run([py, str(REPO / "benchmarks" / "gpu_check.py"), "--cpu-rehearsal",
                               "--wheels", str(out), "--out", str(figures), "--json"],
                              env=env, cwd=d).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / ".whl"), help="folder of the wheel set")
    parser.add_argument("--python", default="3.12",
                        help="the CPython version the set is for (the GPU machine's: 3.12)")
    parser.add_argument("--rehearse", metavar="DIR",
                        help="then run gpu_check's CPU rehearsal with the set as carried")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        fail(f"--out {out} is a file; pass a folder")
    if out.exists():
        shutil.rmtree(out)  # a set is built whole: no wheel left from an older set
    out.mkdir(parents=True)
    chosen, edges = build(out, args.python)
    resolved, pip_line = pip_resolves(out, chosen, args.python)
    unmet = [e for e in edges if e["ok"] is False]
    unchecked = sorted({e["needs"].split(";")[0] for e in edges if e["ok"] is None})
    total = sum(e["bytes"] for e in chosen.values())
    tree = tree_bytes()
    for e in sorted(chosen.values(), key=lambda e: -e["bytes"]):
        how = e.get("repacked")
        note = "" if how is None else (" (LZMA" + "".join(f", without {p}" for p in how["left_out"])
                                       + f": {how['bytes_saved'] / 2**20:.1f} MiB saved)")
        print(f"{e['bytes'] / 2**20:7.2f} MiB  {e['wheel']}{note}")
    print(f"{total / 2**20:7.2f} MiB  in all, {len(chosen)} wheels; the working tree adds "
          f"{tree / 2**20:.2f} MiB: {(CARRY_LIMIT - total - tree) / 2**20:.2f} MiB left of 64")
    print(f"requirements: {len(edges)} edges, {len(unmet)} unmet"
          + "".join(f"\n  unmet: {e['by']} needs {e['needs']} (have {e['met_by']})"
                    for e in unmet))
    print(f"met by the image by name only (its version not known here): {', '.join(unchecked)}")
    print(f"pip --dry-run --no-index for {args.python}: {'ok' if resolved else 'FAILED'}: "
          f"{pip_line}")
    fits = total + tree <= CARRY_LIMIT
    if args.json:
        print(json.dumps({"wheels": chosen, "total_bytes": total, "tree_bytes": tree,
                          "fits_carry_limit": fits, "unmet": unmet, "unchecked": unchecked,
                          "pip_resolves": resolved, "pip": pip_line}))
    if not (resolved and not unmet and fits):
        return 1
    return rehearse(out, edges, args.python, Path(args.rehearse)) if args.rehearse else 0


if __name__ == "__main__":
    sys.exit(main())
