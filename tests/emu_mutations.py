"""Shows that the emulated-kernel suites fail when a kernel is wrong: each mutation below is a plausible
bug, planted in a scratch copy of csrc/; the emulated module is built from that copy and the suites
named with it must fail.

    python3 tests/emu_mutations.py            # every mutation; exit 1 if any went unnoticed
    python3 tests/emu_mutations.py -k owner   # those whose name contains "owner"
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import emu_harness

ROOT = Path(__file__).resolve().parents[1]

# name: (file under csrc/, the exact text, what it becomes, the tests that must notice[, "tsan": under
# ThreadSanitizer, for orderings that the emulation's x86 host would otherwise forgive])
MUTATIONS = {
    "two-shot without its middle barrier": (
        "collectives/collectives.cu", "  s.meet(peers);  // every share is reduced\n", "",
        "test_emu_collectives.py -k two_shot"),
    "a wait that accepts the previous flag (off by one)": (
        "core/wait.cuh", "while ((seen = load_acquire_sys(flag)) < target)",
        "while ((seen = load_acquire_sys(flag)) + 1 < target)", "test_emu_collectives.py -k back_to_back"),
    "one-shot reduce that does not wait for its peers at the end": (
        "collectives/collectives.cu", "sum_range<T, N>(src, a.npes, reinterpret_cast<T*>(a.dst), lo, hi);\n  s.close();",
        "sum_range<T, N>(src, a.npes, reinterpret_cast<T*>(a.dst), lo, hi);\n  s.save();",
        "test_emu_collectives.py -k back_to_back"),
    "the last block drops the remainder": (
        "collectives/collectives.cu", "hi = blockIdx.x + 1 == gridDim.x ? len : units", "hi = units",
        "test_emu_collectives.py -k reductions"),
    "the scalar tail skips an element": (
        "collectives/collectives.cu", "for (std::int64_t i = vec_hi + threadIdx.x; i < hi; i += blockDim.x) {",
        "for (std::int64_t i = vec_hi + 1 + threadIdx.x; i < hi; i += blockDim.x) {",
        "test_emu_collectives.py -k reductions"),
    "gather picks its unit from the destination only": (
        "collectives/collectives.cu",
        "const std::uintptr_t align = reinterpret_cast<std::uintptr_t>(src) | reinterpret_cast<std::uintptr_t>(dst);",
        "const std::uintptr_t align = reinterpret_cast<std::uintptr_t>(dst);", "test_emu_collectives.py -k gather"),
    "fused all-reduce: wrong tile owner for the copiers": (
        "gemm/gemm.cu", "const int owner = t % a.npes;", "const int owner = (t + 1) % a.npes;",
        "test_emu_gemm.py -k all_reduce"),
    "fused reduce-scatter misses the tile its first rows straddle": (
        "gemm/gemm.cu", "const int first = lo / kTileM,", "const int first = (lo + kTileM - 1) / kTileM,",
        "test_emu_gemm.py -k reduce_scatter"),
    "all-gather + GEMM tags its own bands as PE 0's": (
        "gemm/gemm.cu", "band_index(i, a.me, tiles_m)", "band_index(i, 0, tiles_m)", "test_emu_gemm.py -k all_gather"),
    "fused GEMM calls share one tag": (
        "gemm/gemm.cu", "{ ++*ws.gemm_epoch(); }", "{ *ws.gemm_epoch() = 1; }", "test_emu_gemm.py -k back_to_back"),
    "MoE slots: higher PEs' pairs first": (
        "moe/moe.cu", "for (int src = 0; src < me; ++src) slot +=", "for (int src = me + 1; src < a.npes; ++src) slot +=",
        "test_emu_moe.py"),
    "MoE expert counts miss the last PE": (
        "moe/moe.cu", "for (int src = 0; src < a.npes; ++src) total +=", "for (int src = 0; src + 1 < a.npes; ++src) total +=",
        "test_emu_moe.py"),
    "MoE combine ignores the weights": (
        "moe/moe.cu", "acc[n] += w[j] * static_cast<float>(r.v[n]);", "acc[n] += static_cast<float>(r.v[n]);",
        "test_emu_moe.py"),
    "a flag store without release ordering": (
        "core/memory.cuh", "__atomic_store_n(p, v, __ATOMIC_RELEASE);", "__atomic_store_n(p, v, __ATOMIC_RELAXED);",
        "test_emu_collectives.py -k reductions", "tsan"),
}


def run_one(name: str, scratch: Path) -> tuple[bool, float, str]:
    """(caught, seconds, the last line pytest printed)."""
    path, old, new, tests, *variant = MUTATIONS[name]
    csrc = scratch / "csrc"
    shutil.rmtree(csrc, ignore_errors=True)
    shutil.copytree(ROOT / "csrc", csrc)
    target = csrc / path
    text = target.read_text()
    if text.count(old) != 1:
        raise SystemExit(f"mutation {name!r}: {old!r} occurs {text.count(old)} times in csrc/{path}, expected once")
    target.write_text(text.replace(old, new))
    env = {**os.environ, "SYMCOMM_EMU_CSRC": str(csrc)}
    python = sys.executable
    if variant == ["tsan"]:
        python = str(emu_harness.builder(csrc).tsan_python())
        env.update(SYMCOMM_EMU_VARIANT="tsan", OPENBLAS_NUM_THREADS="1", TSAN_OPTIONS="halt_on_error=1 exitcode=66")
    files, *select = tests.split(" ", 1)
    cmd = [python, "-m", "pytest", "-x", "-q", "--noconftest", "-p", "no:cacheprovider",
           str(ROOT / "tests" / files), *(select[0].split(" ", 1) if select else [])]
    start = time.monotonic()
    done = subprocess.run(cmd, cwd=ROOT / "tests", env=env, capture_output=True, text=True, timeout=1200)
    lines = [l for l in (done.stdout + done.stderr).splitlines() if l.strip()]
    built = "emulated build failed" not in done.stdout + done.stderr
    if not built:
        raise SystemExit(f"mutation {name!r} does not compile:\n{done.stdout[-3000:]}")
    return done.returncode != 0, time.monotonic() - start, lines[-1] if lines else ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", default="", help="only the mutations whose name contains this")
    names = [n for n in MUTATIONS if parser.parse_args().k in n]
    missed = []
    with tempfile.TemporaryDirectory(prefix="symcomm-mutants-") as tmp:
        for name in names:
            caught, seconds, last = run_one(name, Path(tmp))
            print(f"{'caught' if caught else 'MISSED'}  {seconds:5.1f} s  {name}  [{last}]", flush=True)
            if not caught:
                missed.append(name)
    print(f"\n{len(names) - len(missed)} of {len(names)} mutations caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
