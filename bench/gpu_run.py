#!/usr/bin/env python3
"""Every GPU result of symcomm, in two prepared calls on the offline, one-GPU machine (docs/gpu-machine.md):

    python3 bench/gpu_run.py --call 1          # build, MPS, the suites at 2 and 4 PEs and on the remote path, benchmarks, traps
    python3 bench/gpu_run.py --call 2          # right after: the steps call 1 could not reach
    python3 bench/gpu_run.py --call 2 --rerun failed --toggle no-mps|eager-loading
    python3 bench/gpu_run.py --plan [--call 2 ...] [--budget S]   # the steps and their seconds, as JSON
    python3 bench/gpu_run.py --plan --markdown # every call's steps as the table in docs/gpu-machine.md
    python3 bench/gpu_run.py --digest          # the source digest a run reports, to compare here

The plan is a list of steps, each with a minimum and a maximum number of seconds. Every step gets its
minimum and the rest of the budget is shared in proportion to what each could still use; a step that
ends early leaves its time to the steps after it. A step that fails or times out is recorded and the
run goes on; a step whose needs failed, or that no longer gets its minimum, is skipped. Each process
runs in its own session and is ended by process group (under MPS, nvidia-smi lists only the server).

After every step $OUT (default ./out) holds all that came so far, at most 8 files, one folder deep:
gpu_run.log (the whole output, capped), summary.json, steps.tar.gz (each step's log, junit and rank
logs) and up to 4 benchmark files in bench/. .git does not travel: name the commit with
SYMCOMM_COMMIT=<sha> or --commit.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
# Seconds for the steps; the device tool's limit for the command is ~30 s more, for the teardown
# and for the grace periods of steps ended at their limit.
BUDGET_S = {1: 420, 2: 300}
GRACE_S = 10  # between SIGTERM and SIGKILL
FILE_CAP = 15 << 20  # the tool returns files of at most 16 MiB
LOG_CAP = 14 << 20  # step output in gpu_run.log, leaving room for the summary table
STEP_LOG_CAP = 2 << 20  # one step's share of gpu_run.log; all of it is in steps.tar.gz
BENCH_KEEP = 4  # with gpu_run.log, summary.json, steps.tar.gz and its temporary: the 8 files that return
MPS_PIPE, MPS_LOG = Path("/tmp/mps-pipe"), Path("/tmp/mps-log")
MPS_PLACES = "/usr/local/nvidia/bin:/usr/bin:/usr/local/cuda/bin"

# Several PEs on one GPU: no NVLink switch to multicast through, no network transport to load
# (symcomm.runtime sets these too; set here so that every process sees them).
BASE_ENV = {"PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1", "NVSHMEM_DISABLE_NVLS": "1",
            "NVSHMEM_REMOTE_TRANSPORT": "none", "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1)}
# Tests fail fast: a peer that never arrives ends a device wait (and a process-group wait) in
# 10 s, a test in 60 s, a suite after 3 failures.
TEST_ENV = {"SYMCOMM_TEST_BACKEND": "nvshmem", "SYMCOMM_TIMEOUT_S": "10"}
PYTEST_OPTS = ["-q", "-rfEs", "--timeout=60", "--maxfail=3", "-o", "junit_logging=system-out"]

TRAP = "test_overflow_stops_the_kernel_with_a_message"
# One shape per fused-GEMM op and dtype (all three paths), back-to-back calls and graph replay.
GEMM_SUBSET = ("(test_gemm_all_reduce and 128- and 4096-4096-False-weight) or (test_gemm_reduce_scatter and 128-4096-4096)"
               " or (test_all_gather_gemm and 128-4096-14336) or test_back_to_back_calls_never_read_stale_tiles"
               " or test_cuda_graph_replay_with_the_inputs_mutated_inside_the_graph")
# At 4 PEs: everything but the all-reduce sweep, of which one size and dtype.
FOUR_PE_SUBSET = "not test_all_reduce_algorithms or 65543-dtype0"


@dataclass(frozen=True)
class Step:
    name: str
    what: str  # one line, for the table in docs/gpu-machine.md
    # argv ("{dir}" is the step's folder) or a built-in step: fn(ctx) -> status
    command: list[str] | Callable[[Ctx], str]
    min_s: int
    max_s: int
    needs: frozenset[str] = frozenset({"build"})  # steps that must have succeeded
    env: dict[str, str] = field(default_factory=dict)
    pes: int = 1  # processes on the GPU: under MPS each gets 100 / pes percent of it
    traps: bool = False  # ends a kernel with a trap on purpose (MPS is restarted after it)


def torchrun(pes: int) -> list[str]:
    return [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={pes}",
            "--log-dir", "{dir}/logs", "--redirects", "3", "--tee", "0:3"]


def suite(name: str, what: str, files: list[str], pes: int, min_s: int, max_s: int, k: str | None = None,
          env: dict[str, str] | None = None) -> Step:
    """The `dist` tests of files at pes PEs, pytest on every rank, one junit file per rank."""
    argv = [*torchrun(pes), "-m", "pytest", *files, "-m", "dist", *(["-k", k] if k else []), *PYTEST_OPTS,
            "--junitxml={dir}/rank{rank}.xml"]
    return Step(name, what, argv, min_s, max_s, env={**TEST_ENV, **(env or {})}, pes=pes)


def single(name: str, what: str, paths: list[str], k: str, min_s: int, max_s: int) -> Step:
    argv = [PY, "-m", "pytest", *paths, "-m", "gpu and not dist", "-k", k, *PYTEST_OPTS, "--junitxml={dir}/junit.xml"]
    return Step(name, what, argv, min_s, max_s, env=TEST_ENV, traps=True)


def bench(name: str, what: str, op: str, options: list[str], min_s: int, max_s: int,
          env: dict[str, str] | None = None) -> Step:
    argv = [*torchrun(2), "-m", "symcomm.bench", op, *options, "--out", "{dir}"]
    return Step(name, what, argv, min_s, max_s, env=env or {}, pes=2)


def plan(call: int = 1, rerun: str = "unreached", toggle: str | None = None) -> list[Step]:
    setup = [
        Step("versions", "GPU, driver, memory (nvidia-smi); nvcc; torch, CUDA, SMs, NVSHMEM wheel, nvshmem4py; the "
             "probe without MPS (SMs read, CUDA-graph siblings at once?)", versions, 15, 30, needs=frozenset()),
        Step("wheels", "pip install --no-index --no-deps --target SITE .whl/*.whl (SITE on PYTHONPATH)",
             wheels, 10, 30, needs=frozenset()),
        Step("build", "pip install --no-build-isolation --no-deps --target SITE . (timed), then import symcomm._C "
             "from SITE; an earlier call's build of the same sources is reused", build, 120, 240, needs=frozenset()),
    ]
    mps = [] if toggle == "no-mps" else [
        Step("mps", "nvidia-cuda-mps-control -d, then the probe as a CUDA client, without and with "
             "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=50; if the client fails, MPS is stopped and the run goes on "
             "without it", start_mps, 15, 50, needs=frozenset())]
    pairs = [
        suite("sanity", "tests/test_nvshmem.py at 2 PEs", ["tests/test_nvshmem.py"], 2, 15, 45),
        suite("collectives", "tests/test_collectives_gpu.py at 2 PEs", ["tests/test_collectives_gpu.py"], 2, 30, 120),
        suite("moe", "tests/test_moe_gpu.py and the MoE contract tests (tests/test_moe.py) at 2 PEs",
              ["tests/test_moe_gpu.py", "tests/test_moe.py"], 2, 20, 60),
        suite("gemm", "tests/test_gemm_gpu.py at 2 PEs: one shape per op and dtype, back-to-back, graph replay",
              ["tests/test_gemm_gpu.py"], 2, 30, 90, k=GEMM_SUBSET),
    ]
    four_pe = suite("4pe", "tests/test_nvshmem.py and tests/test_collectives_gpu.py at 4 PEs (one all-reduce size)",
                    ["tests/test_nvshmem.py", "tests/test_collectives_gpu.py"], 4, 25, 75, k=FOUR_PE_SUBSET)
    # The remote path through NVSHMEM's own transport on one GPU: hierarchical on pretend nodes of 2
    # (nodes of 2 PEs, load/store still reaching), and flat.
    rma = {"SYMCOMM_TRANSPORT": "rma"}
    hierarchical = suite("rma", "tests/test_collectives_gpu.py and tests/test_moe_gpu.py at 4 PEs, SYMCOMM_TRANSPORT=rma "
                         "and SYMCOMM_PES_PER_NODE=2: the hierarchical remote path (one all-reduce size)",
                         ["tests/test_collectives_gpu.py", "tests/test_moe_gpu.py"], 4, 25, 90, k=FOUR_PE_SUBSET,
                         env={**rma, "SYMCOMM_PES_PER_NODE": "2"})
    flat = suite("rma-flat", "tests/test_collectives_gpu.py, tests/test_moe_gpu.py and tests/test_moe.py at 2 PEs, "
                 "SYMCOMM_TRANSPORT=rma: the flat remote path", ["tests/test_collectives_gpu.py", "tests/test_moe_gpu.py",
                                                               "tests/test_moe.py"], 2, 20, 90, env=rma)
    benches = [
        bench("bench-all-reduce", "symcomm.bench all-reduce --algorithms --max-bytes 16M at 2 PEs", "all-reduce",
              ["--algorithms", "--max-bytes", "16M"], 25, 90),
        # The workspace holds the largest partial product (8192 x 8192 bf16 = 128 MiB) in one piece.
        bench("bench-gemm", "symcomm.bench gemm-all-reduce --warmup 3 --iters 10 at 2 PEs", "gemm-all-reduce",
              ["--warmup", "3", "--iters", "10"], 30, 120, env={"SYMCOMM_WORKSPACE_BYTES": str(288 << 20)}),
    ]
    # Both single-process GPU tests end a kernel with a trap (in a child process): they come after
    # everything else that shares the GPU, the one named a trap last, and MPS is restarted after them.
    traps = [
        single("single", "the single-process GPU tests (-m 'gpu and not dist') but the trap", ["tests"],
               f"not {TRAP}", 15, 45),
        single("trap", f"{TRAP} (the MoE overflow trap), last", ["tests/test_moe_gpu.py"], TRAP, 15, 45),
    ]
    if call == 1:
        no_mps = suite("nvshmem-nomps", "tests/test_nvshmem.py at 2 PEs without MPS (limited MPG), NVSHMEM_INFO=1",
                       ["tests/test_nvshmem.py"], 2, 20, 60, env={"NVSHMEM_INFO": "1"})
        return [*setup, no_mps, *mps, *pairs, four_pe, hierarchical, *benches, *traps]
    if rerun == "failed":
        steps = [*setup, *mps, *pairs]
    else:
        rest = suite("gemm-rest", "the rest of tests/test_gemm_gpu.py at 2 PEs", ["tests/test_gemm_gpu.py"], 2,
                     30, 200, k=f"not ({GEMM_SUBSET})")
        steps = [*setup, *mps, flat, *benches, rest, *traps]
    if toggle == "eager-loading":
        # Every kernel loaded at init: no first launch waits for a kernel already running (design.md 5).
        steps = [dataclasses.replace(s, env={**s.env, "CUDA_MODULE_LOADING": "EAGER"}) if "build" in s.needs else s
                 for s in steps]
    return steps


def allocate(steps: list[Step], budget: float) -> list[int]:
    """Seconds for each step: its minimum, plus the rest of the budget shared in proportion to how much
    more each could use (max - min), none past its maximum. A budget short of every minimum gives the
    steps in order their minimum while what is left still holds it, and 0 (skip) to the others."""
    need = sum(s.min_s for s in steps)
    if budget < need:
        given = []
        for s in steps:
            given.append(s.min_s if s.min_s <= budget else 0)
            budget -= given[-1]
        return given
    room = sum(s.max_s - s.min_s for s in steps)
    share = min(1.0, (budget - need) / room) if room else 0.0
    return [s.min_s + int((s.max_s - s.min_s) * share) for s in steps]


# ------------------------------------------------------------------------------------ processes
class Stopped(Exception):
    """The run itself was told to stop (SIGTERM, SIGINT)."""


@dataclass
class Result:
    rc: int | None  # None: ended at its time limit
    out: str

    @property
    def status(self) -> str:
        return "ok" if self.rc == 0 else "timed out" if self.rc is None else f"failed (exit {self.rc})"


def process_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, process group) of every live process (zombies have nothing left to end)."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, parent, group = stat.read_text().rpartition(")")[2].split()[:3]
        except OSError:  # it ended meanwhile
            continue
        if state != "Z":
            table[int(stat.parent.name)] = (int(parent), int(group))
    return table


def tree_groups(pid: int) -> set[int]:
    """The process groups of pid and all its descendants (torchrun starts each rank in its own session)."""
    table = process_table()
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        found.add(p)
        todo += [c for c, (parent, _) in table.items() if parent == p and c not in found]
    return {table[p][1] for p in found if p in table}


def signal_groups(groups: set[int], sig: signal.Signals) -> None:
    for g in groups:
        try:
            os.killpg(g, sig)
        except ProcessLookupError:
            pass


def end_tree(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM to the process group of proc and of each of its descendants, SIGKILL after grace seconds.
    The groups are taken first: a rank whose torchrun has ended is no one's descendant any more."""
    groups = tree_groups(proc.pid)
    signal_groups(groups, signal.SIGTERM)
    end = time.monotonic() + grace
    while time.monotonic() < end and any(g in groups for _, g in process_table().values()):
        time.sleep(0.2)
    if proc.poll() is None:
        groups |= tree_groups(proc.pid)  # started during the grace period
    signal_groups(groups, signal.SIGKILL)
    proc.wait()


def spawn(argv: list[str], env: dict[str, str], deadline: float, sink: Callable[[str], None],
          stdin: str | None = None, output: Path | None = None, grace: float = GRACE_S) -> Result:
    """Runs argv from the repo root in its own session until it ends or the deadline passes (then its
    whole process tree is ended). Its output goes line by line to sink, or to the file output (for a
    daemon, which would hold a pipe open forever). Returns its exit code and output."""
    lines: list[str] = []

    def emit(line: str) -> None:
        lines.append(line)
        sink(line)

    sink(f"$ {shlex.join(argv)}\n")  # to the log, not to the output
    stdout = output.open("wb") if output else subprocess.PIPE
    try:
        proc = subprocess.Popen(argv, env=env, cwd=ROOT, start_new_session=True, stdout=stdout,
                                stderr=subprocess.STDOUT,
                                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL)
    except OSError as e:
        emit(f"{argv[0]}: {e}\n")
        return Result(127, "".join(lines))
    finally:
        if output:
            stdout.close()
    pump = None
    if not output:
        pump = threading.Thread(target=lambda: [emit(b.decode(errors="replace")) for b in proc.stdout], daemon=True)
        pump.start()
    rc = None
    try:
        if stdin is not None:
            try:
                proc.stdin.write(stdin.encode())
                proc.stdin.close()
            except BrokenPipeError:  # it ended without reading: its exit code says why
                pass
        rc = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        emit(f"... time limit reached: ending {argv[0]} and everything it started\n")
    finally:
        if proc.poll() is None:
            end_tree(proc, grace)
        if pump:
            pump.join(timeout=5)
    if output:
        emit(output.read_text(errors="replace"))
    return Result(rc, "".join(lines))


class Log:
    """The run's output: to stdout and gpu_run.log (at most STEP_LOG_CAP of each step's output and
    LOG_CAP in all), and whole to the current step's output.log."""

    def __init__(self, path: Path):
        self.file = path.open("w", encoding="utf-8")
        self.step_file = None
        self.total = self.step_bytes = 0
        self.cut = False

    def begin(self, step_log: Path) -> None:
        self.step_file = step_log.open("a", encoding="utf-8")
        self.step_bytes, self.cut = 0, False

    def end(self) -> None:
        self.step_file.close()
        self.step_file = None

    def step(self, text: str) -> None:
        if self.step_file:
            self.step_file.write(text)
            self.step_file.flush()
        n = len(text.encode())
        if self.step_bytes + n > STEP_LOG_CAP or self.total + n > LOG_CAP:
            if not self.cut:
                self.say("... output cut here; all of it is the step's output.log in steps.tar.gz")
                self.cut = True
            return
        self.step_bytes += n
        self.total += n
        self.write(text)

    def say(self, text: str) -> None:
        self.write(text + "\n")
        if self.step_file:
            self.step_file.write(text + "\n")

    def write(self, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()
        self.file.write(text)
        self.file.flush()


# ------------------------------------------------------------------------------------ outputs
def pack(root: Path, cap: int) -> bytes:
    """root's files as a .tar.gz of at most cap bytes: while it is larger, the largest file loses the
    middle half of what it still holds."""
    files = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    while True:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size, info.mtime = len(data), int(time.time())
                tar.addfile(info, io.BytesIO(data))
        largest = max(files, key=lambda n: len(files[n]), default=None)
        if buf.tell() <= cap or largest is None or len(files[largest]) < 4096:
            return buf.getvalue()
        data = files[largest]
        keep = len(data) // 4
        files[largest] = data[:keep] + f"\n... {len(data) - 2 * keep} bytes cut here ...\n".encode() + data[-keep:]


def write_atomic(path: Path, data: bytes) -> None:
    """A kill while writing leaves the previous version (and at most one temporary file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def publish(out: Path, steps_dir: Path, summary: dict, cap: int = FILE_CAP) -> None:
    """Everything so far into out: summary.json, steps.tar.gz (every step's folder, cut to cap) and the
    first BENCH_KEEP benchmark JSON/PNG files in out/bench/. With gpu_run.log: at most 8 files."""
    write_atomic(out / "summary.json", (json.dumps(summary, indent=1) + "\n").encode())
    write_atomic(out / "steps.tar.gz", pack(steps_dir, cap))
    plots = [p for d in sorted(steps_dir.glob("bench-*")) for p in sorted(d.iterdir())
             if p.suffix in (".json", ".png") and p.stat().st_size <= cap]
    if plots:
        (out / "bench").mkdir(exist_ok=True)
        for p in plots[:BENCH_KEEP]:
            shutil.copyfile(p, out / "bench" / p.name)


def count_junit(folder: Path) -> dict[str, int] | None:
    """passed/failed/skipped over the junit files in folder; a test counts once, failed if any rank failed."""
    outcome: dict[str, str] = {}
    for path in folder.rglob("*.xml"):
        try:
            cases = list(ET.parse(path).getroot().iter("testcase"))
        except ET.ParseError:  # a rank ended while writing it
            continue
        for case in cases:
            key = f"{case.get('classname')}::{case.get('name')}"
            failed = case.find("failure") is not None or case.find("error") is not None
            state = "failed" if failed else "skipped" if case.find("skipped") is not None else "passed"
            if outcome.get(key) != "failed":
                outcome[key] = state
    if not outcome:
        return None
    states = list(outcome.values())
    return {s: states.count(s) for s in ("passed", "failed", "skipped")}


def mpg_mode(folder: Path) -> str | None:
    """The MPG mode the ranks' test_mpg_status printed (design.md section 4: 3 limited, 4 full)."""
    codes = set()
    for path in folder.rglob("*"):
        if path.is_file() and path.suffix in (".xml", ".log"):
            codes |= set(re.findall(r"NVSHMEM init status (\d+)", path.read_text(errors="replace")))
    names = {"3": "limited", "4": "full"}
    found = ", ".join(f"{names.get(c, 'status')} ({c})" for c in sorted(codes))
    return (found + " (ranks disagree)" if len(codes) > 1 else found) or None


# What a kernel that trapped or faulted leaves in a log: CUDA's names for the error (torch's "CUDA error:
# ...", our checks' "... failed: <cudaGetErrorString>"), and our device wait's message before its trap.
CUDA_FAULT = re.compile(r"CUDA error|cudaError[A-Z]\w+|CUDA_ERROR_[A-Z_]+|unspecified launch failure|"
                        r"illegal (memory access|instruction)|device-side assert|misaligned address|"
                        r"symcomm: PE \d+ timed out")


def cuda_fault(folder: Path) -> str | None:
    """The first sign in a step's logs (its output, the ranks' logs, junit) that a kernel trapped or
    faulted, or None."""
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix in (".log", ".xml"):
            if found := CUDA_FAULT.search(path.read_text(errors="replace")):
                return found[0]
    return None


def source_digest() -> str:
    """The digest of the sources that travel: `--digest` here and the run's summary.json agree when the
    run built this tree."""
    files = {}
    for top in ("CMakeLists.txt", "pyproject.toml", "csrc", "python", "tests", "bench"):
        base = ROOT / top
        for p in [base] if base.is_file() else base.rglob("*"):
            rel = p.relative_to(ROOT).as_posix()
            if (p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".so")
                    and ".egg-info" not in rel and not rel.startswith("bench/results/")):
                files[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return hashlib.sha256("".join(f"{h}  {rel}\n" for rel, h in sorted(files.items())).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------ the run
class Runner:
    def __init__(self, steps: list[Step], budget: float, out: Path, work: Path, site: Path, facts: dict,
                 grace: float = GRACE_S):
        self.steps, self.budget, self.out, self.work, self.site, self.grace = steps, budget, out, work, site, grace
        self.facts = facts  # what the summary says besides the steps; built-in steps add to it
        self.steps_dir = work / "steps"
        self.steps_dir.mkdir(parents=True, exist_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(out / "bench", ignore_errors=True)
        self.log = Log(out / "gpu_run.log")
        self.results = {s.name: {"status": "not reached", "given_s": 0, "taken_s": 0} for s in steps}
        self.mps: dict[str, str] = {}  # the environment MPS clients need, while our daemon runs
        self.mps_control = ""  # set once our daemon started
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def run(self) -> None:
        self.log.say(f"symcomm GPU run: {len(self.steps)} steps in {self.budget:.0f} s, OUT={self.out}, "
                     f"work {self.work}\n  commit {self.facts['commit'] or 'unknown'} ({self.facts['commit_source']}),"
                     f" source digest {self.facts['source_digest']}")
        try:
            for i in range(len(self.steps)):
                self.run_step(i)
        except Stopped:
            self.log.say("stopped by a signal")
        finally:
            self.stop_mps()
            self.publish()
            self.log.say(self.table())

    def ok(self, name: str) -> bool:
        return self.results.get(name, {}).get("status", "").startswith("ok")

    def env(self, step: Step) -> dict[str, str]:
        env = {**os.environ, **BASE_ENV, **step.env}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.site), os.environ.get("PYTHONPATH")]))
        if self.mps:
            env.update(self.mps)
            if step.pes > 1:
                # Shares summing to <= 100 are what gives full MPG (kernels of all PEs run at once).
                env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(100 // step.pes)
        return env

    def run_step(self, i: int) -> None:
        step = self.steps[i]
        folder = self.steps_dir / step.name
        folder.mkdir(exist_ok=True)
        given = allocate(self.steps[i:], self.budget - self.elapsed())[0]
        record = self.results[step.name]
        record.update(status="running", given_s=given)
        missing = sorted(n for n in step.needs if not self.ok(n))
        if missing or given < step.min_s:
            record.update(status=f"skipped (needs {', '.join(missing)})" if missing else "skipped (no time)", given_s=0)
            self.log.say(f"\n[+{self.elapsed():.0f} s] {step.name}: {record['status']}")
            self.publish()
            return
        self.log.begin(folder / "output.log")
        self.log.say(f"\n[+{self.elapsed():.0f} s] {step.name} (limit {given} s): {step.what}")
        self.publish()  # a kill during the step still says which step was running
        start = time.monotonic()
        ctx = Ctx(self, step, folder, start + given)
        try:
            if callable(step.command):
                record["status"] = step.command(ctx)
            else:
                record["status"] = ctx.run([a.replace("{dir}", str(folder)) for a in step.command]).status
        except Stopped:
            record["status"] = "stopped (signal)"
            raise
        except Exception as e:  # a bug in a built-in step must not cost the rest of the run
            self.log.step(traceback.format_exc())
            record["status"] = f"failed ({type(e).__name__}: {e})"
        finally:
            record["taken_s"] = round(time.monotonic() - start, 1)
            record["tests"], record["mpg"] = count_junit(folder), mpg_mode(folder)
            self.log.say(f"[+{self.elapsed():.0f} s] {step.name}: {record['status']} in {record['taken_s']:.0f} s"
                         + (f", tests {record['tests']}" if record["tests"] else ""))
            self.log.end()
            self.publish()
        fault = cuda_fault(folder)
        if self.mps and (step.traps or fault) and i + 1 < len(self.steps):
            self.restart_mps(step.name, "it traps on purpose" if step.traps else f"its logs show {fault!r}")

    def restart_mps(self, after: str, why: str) -> None:
        """A kernel that traps or faults under MPS ends every client of the server, and the server takes
        no new ones until it is restarted: so later steps get a fresh daemon (or none, if it fails)."""
        self.log.say(f"restarting MPS after {after} ({why})")
        env, folder = {**os.environ, **self.mps}, self.steps_dir / after
        spawn([self.mps_control], env, time.monotonic() + 20, self.log.step, stdin="quit\n", grace=self.grace)
        started = spawn([self.mps_control, "-d"], env, time.monotonic() + 10, self.log.step,
                        output=folder / "mps-restart.out", grace=self.grace)
        self.facts["mps"].setdefault("restarts", []).append({"after": after, "why": why, "status": started.status})
        if started.rc != 0:
            self.mps = {}
            self.facts["mps"]["detail"] += f"; not restarted after {after} ({started.status}): later steps without it"
        self.publish()

    def stop_mps(self) -> None:
        if self.mps:
            self.log.say("stopping MPS")
            spawn([self.mps_control], {**os.environ, **self.mps}, time.monotonic() + 20, self.log.step, stdin="quit\n")
            self.facts["mps"]["stopped"] = True
            self.mps = {}

    def summary(self) -> dict:
        gpu = self.facts["machine"].get("gpu", "").lower()
        slug = (re.findall(r"\b([a-z]\d{3})\b", gpu) or [re.sub(r"[^a-z0-9]+", "-", gpu).strip("-") or "nogpu"])[0]
        commit = (self.facts["commit"] or "")[:8] or "unknown"
        totals = {k: sum((r.get("tests") or {}).get(k, 0) for r in self.results.values())
                  for k in ("passed", "failed", "skipped")}
        return {**self.facts, "results_dir": f"bench/results/{self.facts['date_utc'][:10]}-{slug}-{commit}",
                "budget_s": self.budget, "elapsed_s": round(self.elapsed()),
                "mpg": {"without_mps": self.results.get("nvshmem-nomps", {}).get("mpg"),
                        "sanity": self.results.get("sanity", {}).get("mpg")},
                "tests_total": totals, "steps": [{"name": n, **r} for n, r in self.results.items()]}

    def publish(self) -> None:
        if self.mps_control and MPS_LOG.is_dir():
            shutil.copytree(MPS_LOG, self.steps_dir / "mps" / "mps-log", dirs_exist_ok=True)
        publish(self.out, self.steps_dir, self.summary())

    def table(self) -> str:
        """The last thing printed (the device tool returns the last 12,000 characters)."""
        s, f = self.summary(), self.facts
        m, v, ext, b = f["machine"], f.get("versions", {}), f.get("extension", {}), f.get("build", {})
        build = self.results.get("build", {}).get("status", "not in this call")
        if b:
            build += f", {b['seconds']} s" + (" (an earlier call's build)" if b["reused"] else "")
        if ext:
            build += f"; _C: NVSHMEM {ext['nvshmem_version']}, CUDA {ext['cuda_version']}, archs {ext['cuda_archs']}"
        lines = ["", "=" * 30 + f" symcomm GPU run, call {f['call']} " + "=" * 30,
                 f"commit    {f['commit'] or 'unknown'} ({f['commit_source']}), source digest {f['source_digest']}",
                 f"results   commit under {s['results_dir']}/ ({s['elapsed_s']} s of a {s['budget_s']:.0f} s budget)",
                 f"gpu       {m.get('gpu')}, driver {m.get('driver')}, {m.get('memory')}, {v.get('sms')} SMs",
                 f"software  torch {v.get('torch')} (CUDA {v.get('torch_cuda')}), "
                 f"nvshmem {v.get('nvidia-nvshmem-cu13')}, "
                 f"nvshmem4py {ext.get('nvshmem4py') or v.get('nvshmem4py-cu13')}, nvcc {m.get('nvcc')}, "
                 f"python {v.get('python')}",
                 f"build     {build}",
                 f"mps       {f['mps']['detail']}" + "".join(f"; restarted after {r['after']}: {r['status']}"
                                                         for r in f["mps"].get("restarts", [])),
                 f"sms       {probe_line(v.get('probe'), f['mps'])}",
                 f"mpg       without MPS: {s['mpg']['without_mps']}; sanity: {s['mpg']['sanity']}",
                 f"{'step':<18}{'given':>6}{'taken':>6}{'passed':>7}{'failed':>7}{'skipped':>8}  status"]
        for r in s["steps"]:
            t = r.get("tests") or {}
            lines.append(f"{r['name']:<18}{r['given_s']:>6}{r['taken_s']:>6.0f}{t.get('passed', ''):>7}"
                         f"{t.get('failed', ''):>7}{t.get('skipped', ''):>8}  {r['status']}")
        total = s["tests_total"]
        lines.append(f"{'all tests':<30}{total['passed']:>7}{total['failed']:>7}{total['skipped']:>8}")
        files = sorted(p.relative_to(self.out).as_posix() for p in self.out.rglob("*") if p.is_file())
        lines.append(f"files     {', '.join(files)}")
        return "\n".join(lines)


def probe_line(alone: dict | None, mps: dict) -> str:
    """The probes' findings in a line: the SM counts a process read, and how graph siblings ran."""
    found = [f"{alone['sms']} read without MPS; graph siblings ran {alone['graph_siblings']}"] if alone else []
    if under := mps.get("probe"):
        found.append(f"under MPS {under['sms']} read without CUDA_MPS_ACTIVE_THREAD_PERCENTAGE, "
                     f"{mps.get('sms_at_50_percent')} at 50%; graph siblings ran {under['graph_siblings']}")
    return "; ".join(found) or "not measured"


@dataclass
class Ctx:
    """What a built-in step works with."""
    runner: Runner
    step: Step
    dir: Path
    deadline: float

    @property
    def facts(self) -> dict:
        return self.runner.facts

    def run(self, argv: list[str], env: dict[str, str] | None = None, limit_s: float | None = None, **kw) -> Result:
        """argv until the step's deadline (or limit_s seconds, if sooner)."""
        deadline = min(self.deadline, time.monotonic() + limit_s) if limit_s else self.deadline
        return spawn(argv, env or self.runner.env(self.step), deadline, self.runner.log.step,
                     grace=self.runner.grace, **kw)


# ------------------------------------------------------------------------------------ built-in steps
# What two choices of symcomm.runtime rest on, measured in a CUDA process (without MPS in `versions`, under
# it in `mps`): the SM count the GPU reports to it (under MPS without and with
# CUDA_MPS_ACTIVE_THREAD_PERCENTAGE, which the runtime takes to be applied to it already), and whether a
# replayed CUDA graph runs two sibling nodes at once (the fused GEMM ops are never captured, as a graph
# may run their two kernels one after the other): two spins of about 25 ms, forked and joined as the
# fused ops would be captured, take about 25 ms if they ran at once, 50 if not.
PROBE_PY = """
import json, sys, time
def probe():
    import torch
    info = {"sms": torch.cuda.get_device_properties(0).multi_processor_count}
    cycles = 50_000_000
    def ms(run):
        torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1e3
    try:
        torch.cuda._sleep(1000)
        alone = min(ms(lambda: torch.cuda._sleep(cycles)) for _ in range(3))
        side, graph = torch.cuda.Stream(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            main = torch.cuda.current_stream()
            side.wait_stream(main)
            with torch.cuda.stream(side):
                torch.cuda._sleep(cycles)
            torch.cuda._sleep(cycles)
            main.wait_stream(side)
        both = min(ms(graph.replay) for _ in range(3))
        verdict = "at once" if both < 1.5 * alone else "one after the other"
        info["graph_siblings"] = f"{verdict} ({both:.1f} ms for both, {alone:.1f} ms for one)"
    except Exception as e:  # recorded: the SM count and the step do not depend on it
        info["graph_siblings"] = f"not measured ({type(e).__name__}: {e})"
    return info
"""

VERSIONS_PY = PROBE_PY + """
import importlib.metadata as md, platform
names = ["torch", "nvidia-nvshmem-cu13", "nvshmem4py-cu13", "cuda-python", "cuda-bindings", "cuda-core",
         "cuda-pathfinder", "numpy", "pytest", "pytest-timeout", "scikit-build-core", "pybind11", "cmake", "ninja"]
info = {"python": platform.python_version()}
for n in names:
    try:
        info[n] = md.version(n)
    except md.PackageNotFoundError:
        info[n] = None
import torch
info["torch_cuda"] = torch.version.cuda
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(device=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                memory_gib=round(p.total_memory / 2**30, 1), devices=torch.cuda.device_count(), probe=probe())
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(json.dumps(info, indent=1))
"""

# The extension must come from SITE, not from another installed copy.
EXTENSION_PY = """
import json, os, sys
import symcomm.runtime as r
m = r.load_extension()
if not os.path.realpath(m.__file__).startswith(os.path.realpath(sys.argv[2]) + os.sep):
    sys.exit(f"symcomm._C was imported from {m.__file__}, not from the build in {sys.argv[2]}")
info = {"module": m.__file__, "nvshmem_version": ".".join(map(str, m.nvshmem_version)),
        "cuda_version": m.cuda_version, "cuda_archs": m.cuda_archs}
try:
    import nvshmem.core
    v = nvshmem.core.get_version()
    info.update(nvshmem4py=v.nvshmem4py_version, libnvshmem_loaded=v.libnvshmem_version)
except Exception as e:  # recorded: the nvshmem suites then fail on their own
    info["nvshmem4py_error"] = f"{type(e).__name__}: {e}"
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(json.dumps(info, indent=1))
"""

MPS_CLIENT_PY = PROBE_PY + """
info = probe()
json.dump(info, open(sys.argv[1], "w"))
print("MPS client ok:", json.dumps(info))
"""


def versions(ctx: Ctx) -> str:
    machine = ctx.facts["machine"]
    ctx.run(["nvidia-smi"])
    q = ctx.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    if q.rc == 0 and q.out.count(",") >= 2:
        first = q.out.splitlines()[0]
        machine["gpu"], machine["driver"], machine["memory"] = (s.strip() for s in first.split(",")[:3])
    nvcc = ctx.run([shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc", "--version"])
    machine["nvcc"] = next(iter(re.findall(r"release [\d.]+, V([\d.]+)", nvcc.out)), None)
    r = ctx.run([PY, "-c", VERSIONS_PY, str(ctx.dir / "versions.json")])
    if r.rc == 0:
        ctx.facts["versions"] = json.loads((ctx.dir / "versions.json").read_text())
    return r.status if q.rc == 0 else f"failed (nvidia-smi: {q.status})"


def wheels(ctx: Ctx) -> str:
    found = sorted((ROOT / ".whl").glob("*.whl"))
    if not found:
        return "failed (no .whl/ here: name .whl in the device tool's carry)"
    ctx.facts["wheels"] = [w.name for w in found]
    return ctx.run([PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
                    "--upgrade", "--target", str(ctx.runner.site), *map(str, found)]).status


def build(ctx: Ctx) -> str:
    """Against the torch and NVSHMEM wheel that are here. No internet, so no build isolation."""
    site, digest = ctx.runner.site, ctx.facts["source_digest"]
    stamp = site / "symcomm-build.json"
    check = [PY, "-c", EXTENSION_PY, str(ctx.dir / "extension.json"), str(site)]
    if stamp.is_file() and json.loads(stamp.read_text())["digest"] == digest and ctx.run(check).rc == 0:
        ctx.facts["build"] = {**json.loads(stamp.read_text()), "reused": True}
        ctx.facts["extension"] = json.loads((ctx.dir / "extension.json").read_text())
        return "ok (already built)"
    # A stale symcomm from an earlier build must not mask a failing one.
    for old in [site / "symcomm", *site.glob("symcomm-*.dist-info"), stamp]:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    start = time.monotonic()
    r = ctx.run([PY, "-m", "pip", "install", "-v", "--no-build-isolation", "--no-deps", "--no-cache-dir", "--upgrade",
                 "--target", str(site), "-C", f"build-dir={ctx.runner.work / 'build'}", "."])
    ctx.facts["build"] = {"digest": digest, "seconds": round(time.monotonic() - start), "reused": False}
    if r.rc != 0:
        return r.status
    e = ctx.run(check)
    if e.rc != 0:
        return f"failed (the extension does not load: {e.status})"
    ctx.facts["extension"] = json.loads((ctx.dir / "extension.json").read_text())
    stamp.write_text(json.dumps(ctx.facts["build"]))
    return "ok"


def start_mps(ctx: Ctx) -> str:
    """As root. NVSHMEM finds MPS by running nvidia-cuda-mps-control from PATH (design.md section 5),
    so its folder goes on PATH for every later step."""
    control = shutil.which("nvidia-cuda-mps-control", path=f"{os.environ.get('PATH', '')}:{MPS_PLACES}")
    mps = ctx.facts["mps"]
    if not control:
        mps["detail"] = "nvidia-cuda-mps-control not found"
        return f"failed ({mps['detail']}): running without MPS"
    env = {"CUDA_MPS_PIPE_DIRECTORY": str(MPS_PIPE), "CUDA_MPS_LOG_DIRECTORY": str(MPS_LOG),
           "PATH": f"{Path(control).parent}:{os.environ.get('PATH', '')}"}
    client_env = {**ctx.runner.env(ctx.step), **env}
    MPS_PIPE.mkdir(parents=True, exist_ok=True)
    MPS_LOG.mkdir(parents=True, exist_ok=True)
    # A daemon left by an earlier call on this (still warm) machine would refuse a second one.
    ctx.run([control], client_env, limit_s=10, stdin="quit\n")
    started = ctx.run([control, "-d"], client_env, limit_s=10, output=ctx.dir / "mps-start.out")
    if started.rc != 0:
        mps["detail"] = f"nvidia-cuda-mps-control -d {started.status}"
        return f"failed ({mps['detail']}): running without MPS"
    ctx.runner.mps, ctx.runner.mps_control = env, control
    client = ctx.run([PY, "-c", MPS_CLIENT_PY, str(ctx.dir / "client.json")], client_env)
    if client.rc != 0:
        mps["detail"] = f"the daemon started but a CUDA client {client.status} under it: MPS stopped"
        ctx.runner.stop_mps()
        return f"failed (MPS client {client.status}): running without MPS"
    mps["probe"] = json.loads((ctx.dir / "client.json").read_text())
    half = ctx.run([PY, "-c", MPS_CLIENT_PY, str(ctx.dir / "client-50.json")],
                   {**client_env, "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "50"})
    mps["sms_at_50_percent"] = json.loads((ctx.dir / "client-50.json").read_text())["sms"] if half.rc == 0 \
        else half.status
    servers = ctx.run([control], client_env, limit_s=10, stdin="get_server_list\n").out.split()
    mps.update(started=True, detail=f"{control}, server(s) {' '.join(servers) or 'none listed'}")
    return "ok"


# ------------------------------------------------------------------------------------ entry point
def markdown_table() -> str:
    """Every call's steps, for docs/gpu-machine.md (tests/test_gpu_run.py checks that it is there)."""
    plans = [("call 1", 1, plan(1)), ("call 2", 2, plan(2)), ("call 2 --rerun failed", 2, plan(2, "failed"))]
    steps: dict[str, Step] = {}
    for _, _, p in plans:
        steps.update({s.name: s for s in p if s.name not in steps})
    lines = [f"| step | {' | '.join(label for label, _, _ in plans)} | min s | max s | what |",
             "|" + " --- |" * (len(plans) + 4)]
    for s in steps.values():
        marks = " | ".join("x" if s.name in {t.name for t in p} else "" for _, _, p in plans)
        lines.append(f"| `{s.name}` | {marks} | {s.min_s} | {s.max_s} | {s.what.replace('|', '/')} |")
    sums = ", ".join(f"{label} {sum(s.min_s for s in p)} s of {BUDGET_S[call]} s" for label, call, p in plans)
    return "\n".join(lines) + f"\n\nSum of the minimums: {sums}."


def commit_of(given: str | None) -> tuple[str | None, str]:
    if given:
        return given, "SYMCOMM_COMMIT or --commit"
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True) \
        if shutil.which("git") else None
    if git and git.returncode == 0:
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return git.stdout.strip(), "git, uncommitted changes" if dirty else "git"
    return None, "unknown: set SYMCOMM_COMMIT"


def first_facts(call: int, rerun: str | None, toggle: str | None, commit: str | None) -> dict:
    """What summary.json says before any step ran."""
    commit, commit_source = commit_of(commit)
    return {"call": call, "rerun": rerun, "toggle": toggle, "commit": commit, "commit_source": commit_source,
            "source_digest": source_digest(), "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": {"kernel": platform.release(), "cpus": os.cpu_count()},
            "mps": {"started": False, "detail": "not tried", "stopped": False}}


def stop(signum, frame) -> None:
    signal.signal(signum, signal.SIG_IGN)  # let the teardown finish
    raise Stopped(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--call", type=int, choices=(1, 2), default=1)
    parser.add_argument("--rerun", choices=("unreached", "failed"),
                        help="call 2: the later steps call 1 could not reach (default), or the 2-PE suites again")
    parser.add_argument("--toggle", choices=("no-mps", "eager-loading"),
                        help="call 2: without MPS, or with CUDA_MODULE_LOADING=EAGER")
    parser.add_argument("--budget", type=int, help="seconds for the steps (default: call 1 420, call 2 300)")
    parser.add_argument("--plan", action="store_true", help="print the steps and their seconds as JSON; run nothing")
    parser.add_argument("--markdown", action="store_true", help="with --plan: every call's steps as a Markdown table")
    parser.add_argument("--commit", default=os.environ.get("SYMCOMM_COMMIT"), help="the commit this tree is")
    parser.add_argument("--digest", action="store_true", help="print the source digest and exit")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "out"))
    parser.add_argument("--site", type=Path, default=Path("/tmp/site"), help="where wheels and symcomm are installed")
    args = parser.parse_args(argv)
    if args.call == 1 and (args.rerun or args.toggle):
        parser.error("--rerun and --toggle are for --call 2")
    if args.digest:
        print(source_digest())
        return 0
    if args.plan and args.markdown:
        print(markdown_table())
        return 0
    steps = plan(args.call, args.rerun or "unreached", args.toggle)
    budget = args.budget or BUDGET_S[args.call]
    short = sum(s.min_s for s in steps) - budget
    if args.plan:  # one step a line
        print("[\n" + ",\n".join(json.dumps(
            {"name": s.name, "seconds": sec, "min_s": s.min_s, "max_s": s.max_s, "pes": s.pes, "needs": sorted(s.needs),
             "env": s.env, "command": s.command if isinstance(s.command, list) else f"built-in {s.command.__name__}"})
            for s, sec in zip(steps, allocate(steps, budget))) + "\n]")
    if short > 0:
        print(f"error: a budget of {budget} s is {short} s short of every step's minimum", file=sys.stderr)
        return 2
    if args.plan:
        return 0

    facts = first_facts(args.call, (args.rerun or "unreached") if args.call == 2 else None, args.toggle, args.commit)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    args.site.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpurun-"))
    runner = Runner(steps, budget, args.out.resolve(), work, args.site.resolve(), facts)
    runner.run()
    shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r["status"].startswith("ok") for r in runner.results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
