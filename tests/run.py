"""Runs every symcomm test suite and prints one summary.

    python tests/run.py                 # CPU suites at world 1, 2, 4 (+ GPU suites if a GPU is visible)
    python tests/run.py --gpu only      # just the GPU suites (several PEs share one GPU if needed)
    python tests/run.py --worlds 2 -k all_reduce

Steps: the machine code of the installed symcomm._C (`-m device_code`: a skip there is a failure),
`pytest tests/` on the CPU (everything else as a world of one, the emulated kernels of `-m emu` among it),
the emulated kernels again under ThreadSanitizer, then the `dist` tests under
torchrun once per world size on the torch backend with CPU tensors (gloo), then the GPU suites on
the nvshmem backend on the emulated device (EMULATED_RUNS: one node, the remote path forced, and
emulated nodes), then, with a GPU, the GPU_SUITES on the nvshmem backend. Each run has a time limit so a hang cannot eat the whole job;
every rank's output is kept, and the log of any rank that failed is printed in full.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

TESTS = Path(__file__).resolve().parent
# The files whose tests run on the nvshmem backend (--gpu): the GPU suites, and the contract tests of
# the ops, layers and benchmarks, which hold on both backends. Never the host-side plan tests
# (test_*_plan.py: their stand-ins read and write the workspace from the host, and on a GPU it is
# device memory) nor the single-process CPU checks. tests/test_suites.py holds this list to the files.
GPU_SUITES = ("test_nvshmem.py", "test_collectives_gpu.py", "test_gemm_gpu.py", "test_moe_gpu.py", "test_ops.py",
              "test_moe.py", "test_nn.py", "test_model.py", "test_bench.py", "test_bench_gemm.py",
              "test_bench_moe.py", "test_bench_tp_layer.py")


@dataclass
class Result:
    name: str
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    crashed: str = ""

    @property
    def ok(self) -> bool:
        return self.failed == 0 and not self.crashed


def count_junit(paths: list[Path]) -> tuple[int, int, int]:
    """(passed, failed, skipped) over the ranks' junit files; a test counts once, failed if any rank failed."""
    outcome: dict[str, str] = {}
    for path in paths:
        for case in ET.parse(path).getroot().iter("testcase"):
            key = f"{case.get('classname')}::{case.get('name')}"
            if case.find("failure") is not None or case.find("error") is not None:
                state = "failed"
            elif case.find("skipped") is not None:
                state = "skipped"
            else:
                state = "passed"
            if key not in outcome or state == "failed":
                outcome[key] = state
    states = list(outcome.values())
    return states.count("passed"), states.count("failed"), states.count("skipped")


def run(name: str, cmd: list[str], env: dict[str, str], junit: list[Path], log_dir: Path | None, timeout: float,
        check=None) -> Result:
    """Runs one step; check(result) may name what makes it fail beyond its failed tests."""
    print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
    start = time.monotonic()
    result = Result(name)
    # Own process group, so that a timeout kills torchrun and every rank it started.
    proc = subprocess.Popen(cmd, env=env, cwd=TESTS.parent, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        result.crashed = f"timed out after {timeout:.0f} s"
    result.seconds = time.monotonic() - start
    found = [p for p in junit if p.exists()]
    if found:
        result.passed, result.failed, result.skipped = count_junit(found)
    if len(found) < len(junit) and not result.crashed:
        result.crashed = f"exit code {proc.returncode}, {len(junit) - len(found)} rank(s) wrote no report"
    # pytest: 0 passed, 1 tests failed, 5 nothing selected; anything else is a crash.
    if proc.returncode not in (0, 1, 5) and not result.crashed:
        result.crashed = f"exit code {proc.returncode}"
    if check is not None and not result.crashed:
        result.crashed = check(result)
    if result.ok:
        tail = [line for line in out.splitlines() if line.startswith("symcomm tests:") or " passed" in line]
        print("\n".join(tail[-3:]) if tail else out[-2000:])
    else:
        print(out)
        for log in sorted(log_dir.rglob("*.log")) if log_dir else []:
            print(f"--- {log.relative_to(log_dir)}\n{log.read_text(errors='replace')}")
    status = "ok" if result.ok else f"FAILED {result.crashed}".strip()
    print(f"=== {name}: {result.passed} passed, {result.failed} failed, {result.skipped} skipped "
          f"in {result.seconds:.0f} s [{status}]", flush=True)
    return result


# Devices a step runs on: "cpu" (the torch backend, gloo), "emulated" (the nvshmem backend on the
# emulated device, csrc/emu/: the GPU suites without a GPU) and "gpu".
# The emulated runs: (name, world size, files, environment). At 3 ranks only the GPU files, since the
# contract suites size their inputs for 1, 2 and 4 ranks. Then the remote path: forced on one node
# (SYMCOMM_TRANSPORT=rma), and on emulated nodes that load/store does not reach across (2 x 2 PEs,
# 3 x 1 PE), where it is the only path; and MoE at 10 PEs (2 x 5), beyond what a load/store kernel reads.
GPU_FILES = ("test_nvshmem.py", "test_collectives_gpu.py", "test_gemm_gpu.py", "test_moe_gpu.py")
EMULATED_RUNS = [
    ("", 2, GPU_SUITES, {}),
    ("", 3, GPU_FILES, {}),
    (" rma", 2, ("test_collectives_gpu.py", "test_moe.py", "test_moe_gpu.py", "test_ops.py", "test_bench.py",
              "test_bench_moe.py"), {"SYMCOMM_TRANSPORT": "rma"}),
    (" 2 nodes", 4, ("test_collectives_gpu.py", "test_moe.py", "test_moe_gpu.py", "test_bench_moe.py"),
     {"SYMCOMM_PES_PER_NODE": "2"}),
    (" 3 nodes", 3, ("test_collectives_gpu.py", "test_moe_gpu.py"), {"SYMCOMM_PES_PER_NODE": "1"}),
    (" 2 nodes", 10, ("test_moe_gpu.py",), {"SYMCOMM_PES_PER_NODE": "5"}),
]
EMULATED_WORKSPACE_BYTES = 3 << 19  # small, so that the GPU suites' largest cases chunk at small sizes


def selection(device: str, dist: bool, files: tuple[str, ...] = GPU_SUITES) -> list[str]:
    """The paths and marker of a step's pytest run: on the CPU, every file (a world of one: all but the
    device_code tests, which have a step of their own); on the (emulated) GPU, the single-process or `dist`
    tests of `files` (GPU suites)."""
    if device == "cpu":
        return [str(TESTS)] + ["-m", "dist and not gpu" if dist else "not device_code"]
    return [str(TESTS / f) for f in files] + ["-m", "dist" if dist else "gpu and not dist"]


def environment(device: str) -> dict[str, str]:
    env = dict(os.environ)
    env["SYMCOMM_TEST_BACKEND"] = "torch" if device == "cpu" else "nvshmem"
    env.pop("SYMCOMM_EMU_MODULE", None)
    if device != "gpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    if device == "emulated":
        import emu_harness

        env["SYMCOMM_EMU_MODULE"] = str(emu_harness.builder(TESTS.parent / "csrc").build("plain"))
        env.setdefault("SYMCOMM_WORKSPACE_BYTES", str(EMULATED_WORKSPACE_BYTES))
    return env


def pytest_args(selected: list[str], junit: Path, extra: list[str]) -> list[str]:
    return ["-m", "pytest", *selected, "-q", "-rfEs", f"--junitxml={junit}", *extra]


def single(work: Path, device: str, extra: list[str], timeout: float) -> Result:
    """On the CPU, plain `pytest tests/`: what the README promises runs everything as a world of one."""
    name = "world of one" if device == "cpu" else f"{device} single-process"
    junit = work / f"{name.replace(' ', '-')}.xml"
    cmd = [sys.executable, *pytest_args(selection(device, dist=False), junit, extra)]
    return run(name, cmd, environment(device), [junit], None, timeout)


def device_code(work: Path, extra: list[str], timeout: float) -> Result:
    """The installed symcomm._C read with cuobjdump and nvdisasm (tests/device_code.py). They need no GPU,
    so nothing excuses a skip: a missing tool or extension fails the step, and so does selecting none."""
    junit = work / "device-code.xml"
    cmd = [sys.executable, *pytest_args([str(TESTS), "-m", "device_code"], junit, extra)]

    def every_test_ran(result: Result) -> str:
        if result.skipped or (result.passed == 0 and not extra):
            return f"{result.skipped} skipped and {result.passed} passed: every device_code test must run"
        return ""

    return run("device code", cmd, environment("cpu"), [junit], None, timeout, every_test_ran)


def emu_tsan(work: Path, extra: list[str], timeout: float) -> Result:
    """The emulated-kernel suites in an interpreter linked with ThreadSanitizer, on the tsan build of the
    kernels; any race report ends the run with exit code 66."""
    import emu_harness

    builder = emu_harness.builder(TESTS.parent / "csrc")
    junit = work / "emu-tsan.xml"
    # OpenBLAS's own thread pool (numpy's references) synchronises in ways the sanitizer cannot see.
    env = {**os.environ, "SYMCOMM_EMU_VARIANT": "tsan", "OPENBLAS_NUM_THREADS": "1",
           "TSAN_OPTIONS": "halt_on_error=1 exitcode=66"}
    # --noconftest: conftest.py imports torch, which the suites do not need; --capture=sys lets a
    # sanitizer report reach the log.
    cmd = [str(builder.tsan_python()),
           *pytest_args([*map(str, sorted(TESTS.glob("test_emu_*.py"))), "-m", "emu"], junit,
                        ["--noconftest", "--capture=sys", *extra])]
    return run("emu tsan", cmd, env, [junit], None, timeout)


def distributed(work: Path, world: int, device: str, extra: list[str], timeout: float,
                files: tuple[str, ...] = GPU_SUITES, name: str = "", env_extra: dict[str, str] | None = None) -> Result:
    out = work / f"{device}-w{world}{name.replace(' ', '-')}"
    out.mkdir()
    env = {**environment(device), **(env_extra or {})}
    if device == "gpu" and "CUDA_MPS_PIPE_DIRECTORY" in env:
        # Under MPS each PE gets an equal share of the SMs; shares summing to <= 100 are what lets
        # NVSHMEM run in full MPG mode (kernels of different PEs run concurrently).
        env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(100 // world)
    env.setdefault("SYMCOMM_TIMEOUT_S", "120")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}", "--log-dir", str(out / "logs"),
           "--redirects", "3", "--tee", "0:3", *pytest_args(selection(device, True, files), out / "rank{rank}.xml", extra)]
    junit = [out / f"rank{r}.xml" for r in range(world)]
    return run(f"{device} world {world}{name}", cmd, env, junit, out / "logs", timeout)


def no_heaps_left() -> Result:
    """The emulated device's heaps are shared-memory segments: none may outlive the runs (the kill of a
    timed-out run included, whose leftovers the next start would remove)."""
    left = sorted(p.name for p in Path("/dev/shm").glob("symcomm-emu-*"))
    return Result("emulated heaps", passed=not left, crashed=f"segments left in /dev/shm: {left}" if left else "")


def gpu_present() -> bool:
    probe = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", default="1,2,4", help="torchrun world sizes (default 1,2,4)")
    parser.add_argument("--gpu", choices=("auto", "yes", "no", "only"), default="auto",
                        help="GPU suites: auto = when a GPU is visible")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per run (default 900)")
    parser.add_argument("--keep", metavar="DIR", help="keep logs and junit files in DIR")
    parser.add_argument("--no-single", action="store_true", help="skip the single-process suites")
    args, extra = parser.parse_known_args()
    worlds = [int(w) for w in args.worlds.split(",")]
    gpu = args.gpu in ("yes", "only") or (args.gpu == "auto" and gpu_present())

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="symcomm-tests-"))
    work.mkdir(parents=True, exist_ok=True)
    results = []
    if args.gpu != "only":
        if not args.no_single:
            results.append(device_code(work, extra, args.timeout))
            results.append(single(work, "cpu", extra, args.timeout))
            results.append(emu_tsan(work, extra, args.timeout))
        results += [distributed(work, w, "cpu", extra, args.timeout) for w in worlds]
        if not args.no_single:
            results.append(single(work, "emulated", extra, args.timeout))
        results += [distributed(work, w, "emulated", extra, args.timeout, files, name, env)
                    for name, w, files, env in EMULATED_RUNS]
        results.append(no_heaps_left())
    if gpu:
        if not args.no_single:
            results.append(single(work, "gpu", extra, args.timeout))
        results += [distributed(work, w, "gpu", extra, args.timeout) for w in worlds]
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)

    print("\n" + "\n".join(f"{r.name:>24}: {r.passed:4d} passed {r.failed:3d} failed {r.skipped:3d} skipped "
                           f"{r.seconds:6.0f} s {'' if r.ok else 'FAILED ' + r.crashed}" for r in results))
    passed = sum(r.passed for r in results)
    # A run that crashed or timed out counts as one failure on top of the tests it reported.
    failed = sum(r.failed + bool(r.crashed) for r in results)
    print(f"total: {passed} passed, {failed} failed, {sum(r.skipped for r in results)} skipped")
    return 0 if failed == 0 and passed > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
