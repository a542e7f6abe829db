"""What tests/run.py and bench/gpu_run.py run on a GPU, checked without one: pytest collects what
`tests/run.py --gpu only` would at every world size, and it must be every GPU suite and no host-only
test (a host-side stand-in on GPU memory is a segfault that ends the whole suite)."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import run

TESTS = Path(__file__).resolve().parent
# Tests that must never run on the nvshmem backend, and why.
HOST_ONLY = {
    "test_collectives_plan.py": "stand-ins read and write the workspace from the host",
    "test_gemm_plan.py": "stand-ins read and write the workspace from the host",
    "test_moe_plan.py": "stand-ins read and write the workspace from the host",
    "test_emu_collectives.py": "the emulated device",
    "test_emu_gemm.py": "the emulated device",
    "test_emu_moe.py": "the emulated device",
    "test_emu_processes.py": "the emulated device",
    "test_emu_sanity.py": "the emulated device",
}


def collect(args: list[str], env: dict[str, str]) -> list[str]:
    """The ids of the tests pytest would run with these arguments (a file, a marker, a -k)."""
    out = subprocess.run([sys.executable, "-m", "pytest", *args, "--collect-only", "-q", "-p", "no:cacheprovider"],
                         cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode in (0, 5), out.stdout[-3000:] + out.stderr[-3000:]
    return [line for line in out.stdout.splitlines() if "::" in line]


def collected(gpu: bool, dist: bool, world: int) -> set[str]:
    """The files of the tests a step would run, as pytest collects them for one of its ranks."""
    device = "gpu" if gpu else "cpu"
    env = {**run.environment(device), "WORLD_SIZE": str(world), "RANK": "0", "LOCAL_RANK": "0"}
    return {test.split("::", 1)[0].rsplit("/", 1)[-1] for test in collect(run.selection(device, dist), env)}


def load_gpu_run():
    spec = importlib.util.spec_from_file_location("gpu_run", TESTS.parent / "bench" / "gpu_run.py")
    gpu_run = importlib.util.module_from_spec(spec)
    sys.modules["gpu_run"] = gpu_run  # dataclasses look their module up there
    spec.loader.exec_module(gpu_run)
    return gpu_run


@pytest.mark.parametrize("pes", [1, 2, 4])
def test_the_gpu_runs_collect_every_gpu_suite_and_no_host_only_test(pes):
    files = collected(gpu=True, dist=True, world=pes)
    assert not files & HOST_ONLY.keys(), f"host-only tests on the GPU: {sorted(files & HOST_ONLY.keys())}"
    assert files == set(run.GPU_SUITES), f"GPU suites with no dist test collected: {sorted(set(run.GPU_SUITES) - files)}"


def test_the_emulated_runs_run_gpu_suites():
    assert all(set(files) <= set(run.GPU_SUITES) for _, _, files, _ in run.EMULATED_RUNS)
    # Each run has a name of its own (its logs' folder and its line in the summary).
    assert len({(name, world) for name, world, _, _ in run.EMULATED_RUNS}) == len(run.EMULATED_RUNS)


def test_the_gpu_single_process_run_is_the_gpu_marked_tests():
    assert collected(gpu=True, dist=False, world=1) == {"test_nvshmem.py", "test_moe_gpu.py"}


def test_every_test_file_is_either_a_gpu_suite_or_host_only_or_cpu_only():
    # A new test file must be placed: on the GPU (GPU_SUITES), never there (HOST_ONLY), or among the
    # single-process CPU checks, which have no `dist` or `gpu` test.
    marked = re.compile(r"^(\s*@pytest\.mark\.(dist|gpu)\b|pytestmark = .*\bmark\.(dist|gpu)\b)", re.M)
    for path in sorted(TESTS.glob("test_*.py")):
        runs_on_gpu_if_listed = bool(marked.search(path.read_text()))
        if path.name in run.GPU_SUITES:
            assert runs_on_gpu_if_listed, f"{path.name} is a GPU suite without a dist or gpu test"
        elif path.name not in HOST_ONLY:
            assert not runs_on_gpu_if_listed, (f"{path.name} has dist or gpu tests: list it in tests/run.py's "
                                               "GPU_SUITES, or in HOST_ONLY here with the reason")


def test_gpu_run_runs_only_gpu_suites_and_each_selection_selects_tests():
    gpu_run = load_gpu_run()
    steps = {step.name: step.command for call in (1, 2) for step in gpu_run.plan(call)
             if isinstance(step.command, list) and "pytest" in step.command}
    named = {os.path.basename(a) for argv in steps.values() for a in argv if a.startswith("tests/")}
    assert named and named <= set(run.GPU_SUITES), sorted(named - set(run.GPU_SUITES))
    env = run.environment("gpu")
    for name, argv in steps.items():
        # The step's files, marker and -k, without torchrun or the report options.
        start = argv.index("pytest") + 1
        chosen = [a for a in argv[start:] if a.startswith("tests/")]
        for flag in ("-m", "-k"):
            if flag in argv[start:]:
                chosen += [flag, argv[argv.index(flag, start) + 1]]
        assert collect(chosen, env), f"gpu_run step {name!r} selects no test: {chosen}"
