"""Builds the emulated extension (`_emu`) from this checkout's csrc/ with the host C++ compiler.

    python3 csrc/emu/build.py [--variant plain|tsan]     # prints the module's path
    python3 csrc/emu/build.py --tsan-python              # prints the path of the tsan interpreter

The build is cached under build/emu/<variant>-<hash>/, keyed by every file in csrc/ and the flags, so
an edited kernel is rebuilt the next time a test loads the module, without reinstalling symcomm.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CSRC = Path(__file__).resolve().parents[1]
ROOT = CSRC.parent
# The kernels and host code of csrc/, less the CUTLASS core (replaced by emu/gemm.cpp).
SOURCES = ["bindings.cpp", "core/device_state.cu", "core/sanity.cu", "collectives/collectives.cu", "moe/moe.cu",
           "gemm/gemm.cu", "emu/runtime.cpp", "emu/rma.cpp", "emu/gemm.cpp", "emu/bindings.cpp"]
VARIANTS = {
    "plain": ["-O2"],
    # ThreadSanitizer: load it in the interpreter that tsan_python() builds.
    "tsan": ["-O1", "-fsanitize=thread"],
}


def _cuda_include() -> Path:
    candidates = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.insert(0, str(Path(nvcc).resolve().parents[1]))
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_fp16.h").exists():
            return Path(c) / "include"
    raise RuntimeError("the emulated build needs the CUDA headers (cuda_runtime.h, cuda_fp16.h): "
                       "put nvcc on PATH or set CUDA_HOME")


def _includes() -> list[str]:
    import nvidia.nvshmem
    import pybind11

    nvshmem = Path(list(nvidia.nvshmem.__path__)[0]) / "include"
    # Our emu/include comes first: its nvshmem.h stands in for NVSHMEM's.
    dirs = [CSRC / "emu" / "include", CSRC, _cuda_include(), nvshmem, Path(pybind11.get_include()),
            Path(sysconfig.get_paths()["include"])]
    return [f"-I{d}" for d in dirs]


def _flags(variant: str) -> list[str]:
    return ["-std=c++17", "-g", "-fPIC", "-pthread", "-fvisibility=hidden", "-fno-strict-aliasing", "-DSYMCOMM_EMU",
            "-include", "emu/device.h", "-Wno-attributes", *VARIANTS[variant], *_includes()]


def _key(variant: str, cxx: str) -> str:
    h = hashlib.sha256()
    for path in sorted(CSRC.rglob("*")):
        if path.is_file() and path.suffix in {".h", ".cuh", ".cu", ".cpp"}:
            h.update(str(path.relative_to(CSRC)).encode())
            h.update(path.read_bytes())
    h.update(" ".join([cxx, *_flags(variant)]).encode())
    h.update(subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.encode())
    return h.hexdigest()[:16]


def build(variant: str = "plain") -> Path:
    """The path of the built module, building it first if csrc/ changed since the last build."""
    cxx = os.environ.get("CXX", "g++")
    out_dir = ROOT / "build" / "emu" / f"{variant}-{_key(variant, cxx)}"
    module = out_dir / f"_emu{sysconfig.get_config_var('EXT_SUFFIX')}"
    if module.exists():
        return module
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{variant}-"))
    flags = _flags(variant)

    def compile_one(src: str) -> Path:
        obj = work / (src.replace("/", "_") + ".o")
        cmd = [cxx, *flags, "-x", "c++", "-c", str(CSRC / src), "-o", str(obj)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"emulated build failed: {' '.join(cmd)}\n{done.stderr}")
        return obj

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        objects = list(pool.map(compile_one, SOURCES))
    link = [cxx, "-shared", "-pthread", *VARIANTS[variant], *map(str, objects), "-o", str(work / module.name)]
    done = subprocess.run(link, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"emulated link failed: {' '.join(link)}\n{done.stderr}")
    try:
        work.rename(out_dir)
    except OSError:  # built meanwhile by another process
        shutil.rmtree(work, ignore_errors=True)
    return module


def load(variant: str = "plain"):
    """The emulated extension module, built from this checkout if needed."""
    path = build(variant)
    loader = importlib.machinery.ExtensionFileLoader("_emu", str(path))
    spec = importlib.util.spec_from_file_location("_emu", path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def tsan_python() -> Path:
    """A Python interpreter linked with ThreadSanitizer (emu/python_main.cpp), to run the tsan variant."""
    cxx = os.environ.get("CXX", "g++")
    var = sysconfig.get_config_var
    libdir = var("LIBDIR")
    # What `python3-config --ldflags --embed` prints, plus the exports that extension modules link against.
    embed = [f"-L{libdir}", f"-Wl,-rpath,{libdir}", f"-lpython{var('VERSION')}{var('ABIFLAGS') or ''}",
             *(var("LIBS") or "").split(), *(var("SYSLIBS") or "").split(), "-Wl,-export-dynamic"]
    cmd = [cxx, "-O1", "-fsanitize=thread", f"-I{sysconfig.get_paths()['include']}",
           str(CSRC / "emu" / "python_main.cpp"), *embed]
    key = hashlib.sha256(" ".join(cmd).encode() + (CSRC / "emu" / "python_main.cpp").read_bytes()).hexdigest()[:16]
    exe = ROOT / "build" / "emu" / f"tsan-python-{key}"
    if not exe.exists():
        exe.parent.mkdir(parents=True, exist_ok=True)
        tmp = exe.with_suffix(".tmp")
        done = subprocess.run([*cmd, "-o", str(tmp)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"building the tsan interpreter failed: {' '.join(cmd)}\n{done.stderr}")
        tmp.rename(exe)
    return exe


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="plain")
    parser.add_argument("--tsan-python", action="store_true", help="build the tsan interpreter instead")
    args = parser.parse_args()
    print(tsan_python() if args.tsan_python else build(args.variant))
