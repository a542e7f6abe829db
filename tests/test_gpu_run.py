"""bench/gpu_run.py on the CPU: its plans fit their budgets and point at tests that exist, unused time
flows to later steps, a timed-out step's whole process tree ends, and what a run leaves in $OUT stays
within what the device tool returns (8 files, 2 folders deep, 16 MiB each)."""

import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from _pytest.mark.expression import Expression

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_run.py"
CALLS = {
    "call 1": ["--call", "1"],
    "call 2": ["--call", "2"],
    "call 2 no-mps": ["--call", "2", "--rerun", "failed", "--toggle", "no-mps"],
    "call 2 eager": ["--call", "2", "--rerun", "failed", "--toggle", "eager-loading"],
    "call 2 unreached no-mps": ["--call", "2", "--rerun", "unreached", "--toggle", "no-mps"],
}


def load():
    spec = importlib.util.spec_from_file_location("gpu_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_run"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gpu_run = load()


def plan_json(*args):
    out = subprocess.run([sys.executable, str(SCRIPT), "--plan", *args], capture_output=True, text=True, timeout=60)
    return out.returncode, out.stdout, out.stderr


@pytest.mark.parametrize("call", CALLS)
def test_every_plan_fits_its_budget(call):
    rc, out, err = plan_json(*CALLS[call])
    assert rc == 0, err
    steps = json.loads(out)
    budget = gpu_run.BUDGET_S[int(CALLS[call][1])]
    assert sum(s["seconds"] for s in steps) <= budget
    assert all(s["min_s"] <= s["seconds"] <= s["max_s"] for s in steps), steps
    names = [s["name"] for s in steps]
    assert len(set(names)) == len(names)
    assert names[:3] == ["versions", "wheels", "build"]
    assert ("mps" in names) == ("no-mps" not in call)
    if "--rerun" not in CALLS[call] or "unreached" in CALLS[call]:
        assert names[-1] == "trap"


def test_call_1_runs_in_the_required_order():
    rc, out, err = plan_json("--call", "1")
    names = [s["name"] for s in json.loads(out)]
    assert names[:8] == ["versions", "wheels", "build", "nvshmem-nomps", "mps", "sanity", "collectives", "moe"]
    assert {"gemm", "4pe", "rma", "single", "bench-all-reduce", "bench-gemm"} <= set(names) and names[-1] == "trap"


def test_call_2_reruns_what_its_flags_say():
    unreached = [s["name"] for s in json.loads(plan_json("--call", "2")[1])]
    assert {"rma-flat", "single", "trap", "bench-all-reduce", "bench-gemm", "gemm-rest"} <= set(unreached)
    assert "sanity" not in unreached
    failed = json.loads(plan_json(*CALLS["call 2 eager"])[1])
    assert [s["name"] for s in failed][-4:] == ["sanity", "collectives", "moe", "gemm"]
    assert all(s["env"].get("CUDA_MODULE_LOADING") == "EAGER" for s in failed if "build" in s["needs"])


def test_a_budget_short_of_the_minimums_is_refused():
    rc, _, err = plan_json("--budget", "100")
    assert rc == 2 and "short" in err


def test_toggles_belong_to_call_2():
    assert plan_json("--call", "1", "--toggle", "no-mps")[0] != 0


def test_time_a_step_leaves_goes_to_the_later_steps():
    steps = gpu_run.plan(1)
    budget = 420
    planned = gpu_run.allocate(steps, budget)
    assert sum(planned) <= budget and all(s.min_s <= g <= s.max_s for s, g in zip(steps, planned))
    # The first step is done after 1 of its seconds: what is left is shared again.
    later = gpu_run.allocate(steps[1:], budget - 1)
    assert all(a >= b for a, b in zip(later, planned[1:]))
    assert sum(later) > sum(planned[1:])
    # Plenty of time: every step its maximum, no more.
    assert gpu_run.allocate(steps, 10_000) == [s.max_s for s in steps]


def test_a_short_budget_gives_minimums_in_order_then_skips():
    steps = [gpu_run.Step(n, "", [], lo, hi) for n, lo, hi in (("a", 30, 60), ("b", 50, 90), ("c", 10, 20))]
    assert gpu_run.allocate(steps, 70) == [30, 0, 10]
    assert gpu_run.allocate(steps, 20) == [0, 0, 10]
    assert gpu_run.allocate(steps, 90) == [30, 50, 10]


def pytest_parts(step):
    """(paths, -m expression, -k expression or None) of a pytest step."""
    args = step.command[step.command.index("pytest") + 1:]
    paths = args[:args.index("-m")]
    return paths, args[args.index("-m") + 1], args[args.index("-k") + 1] if "-k" in args else None


def pytest_steps():
    found = {}
    for call, rerun in ((1, "unreached"), (2, "unreached"), (2, "failed")):
        for s in gpu_run.plan(call, rerun):
            if isinstance(s.command, list) and "pytest" in s.command:
                found.setdefault(s.name, s)
    return list(found.values())


# Prints every collected test's id and markers, so that one collection serves every step's -m and -k.
LISTER = """
def pytest_collection_finish(session):
    for item in session.items:
        print("ITEM", item.nodeid, *sorted({m.name for m in item.iter_markers()}))
"""


def test_the_plan_names_only_tests_that_exist(tmp_path):
    steps = pytest_steps()
    assert {"nvshmem-nomps", "sanity", "collectives", "moe", "gemm", "4pe", "rma", "rma-flat", "single", "trap",
            "gemm-rest"} <= \
        {s.name for s in steps}
    for s in steps:
        paths, _, k = pytest_parts(s)
        sources = "".join((ROOT / p).read_text() if p.endswith(".py") else
                          "".join(f.read_text() for f in (ROOT / p).glob("test_*.py")) for p in paths)
        for name in named_tests(k):
            assert f"def {name}(" in sources, f"{s.name}: -k names {name}, which {paths} do not define"
    # Each step's -m and -k select at least one test, by pytest's own grammar, on the collected tests.
    (tmp_path / "lister.py").write_text(LISTER)
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "lister", "tests"], cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(tmp_path)}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:]
    tests = [line.split()[1:] for line in out.stdout.splitlines() if line.startswith("ITEM ")]
    for s in steps:
        paths, marker, k = pytest_parts(s)
        chosen = [node for node, *marks in tests
                  if any(node.startswith(p + ("::" if p.endswith(".py") else "/")) for p in paths)
                  and Expression.compile(marker).evaluate(lambda name, **_: name in marks)
                  and (not k or Expression.compile(k).evaluate(
                      lambda name, **_: any(name.lower() in part.lower() for part in node.split("::"))))]
        assert chosen, f"{s.name}: {paths} -m {marker!r} -k {k!r} selects no test"


def named_tests(k):
    """The test function names a -k expression spells out."""
    return [w for w in (k or "").replace("(", " ").replace(")", " ").split() if w.startswith("test_")]


def test_the_docs_show_the_current_plan():
    assert gpu_run.markdown_table() in (ROOT / "docs" / "gpu-machine.md").read_text()


def test_the_digest_names_the_sources():
    out = subprocess.run([sys.executable, str(SCRIPT), "--digest"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and len(out.stdout.strip()) == 16
    assert out.stdout.strip() == gpu_run.source_digest()


def returned(out: Path, cap: int):
    """What the device tool would return of out: every file at most 2 folders deep and cap bytes."""
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8, files
    assert all(len(p.relative_to(out).parts) <= 3 for p in files), files
    assert all(p.stat().st_size <= cap for p in files), [(p, p.stat().st_size) for p in files]
    return files


def test_publish_keeps_out_within_the_limits(tmp_path):
    steps, out = tmp_path / "steps", tmp_path / "out"
    out.mkdir()
    (out / "gpu_run.log").write_text("log\n")
    big = steps / "collectives"
    (big / "logs" / "run" / "attempt_0" / "0").mkdir(parents=True)
    # Hex noise compresses only about 2:1: 3 MiB of it must lose its middle to fit a 1 MiB cap.
    noise = "".join(f"{i:08x} {hash((i, 'x')) & 0xFFFFFFFF:08x}\n" for i in range(180_000))
    (big / "logs" / "run" / "attempt_0" / "0" / "stdout.log").write_text("FIRST\n" + noise + "LAST\n")
    (big / "rank0.xml").write_text('<testsuite><testcase classname="c" name="t"/></testsuite>')
    for name in ("bench-all-reduce", "bench-gemm"):
        (steps / name).mkdir()
        for f in ("a.json", "a.png", "a.csv", "b.json", "b.png"):
            (steps / name / f).write_text(f)
    gpu_run.publish(out, steps, {"steps": []}, cap=1 << 20)
    files = returned(out, 1 << 20)
    assert len(list((out / "bench").iterdir())) == gpu_run.BENCH_KEEP
    with tarfile.open(out / "steps.tar.gz") as tar:
        assert "collectives/rank0.xml" in tar.getnames()
        log = tar.extractfile("collectives/logs/run/attempt_0/0/stdout.log").read()
    assert log.startswith(b"FIRST") and log.endswith(b"LAST\n") and b"bytes cut here" in log
    assert json.loads((out / "summary.json").read_text()) == {"steps": []}
    assert not [p for p in files if p.name.endswith(".tmp")]


def test_a_run_records_every_step_and_returns_within_the_limits(tmp_path):
    py = sys.executable
    # A 20 s budget: the quick steps get their 5 s minimum each while it lasts; what they leave goes to
    # "slow" (1 s, then ended); "too-big" never gets its 50 s.
    steps = [
        gpu_run.Step("build", "", [py, "-c", "print('built')"], 5, 10, needs=frozenset()),
        gpu_run.Step("junit", "", [py, "-c", "import pathlib; pathlib.Path(r'{dir}/rank0.xml').write_text("
                                   "'<testsuite><testcase classname=\"c\" name=\"a\"/><testcase classname=\"c\" "
                                   "name=\"b\"><failure/></testcase></testsuite>'); raise SystemExit(1)"], 5, 10),
        gpu_run.Step("broken", "", [py, "-c", "raise SystemExit(3)"], 5, 10, needs=frozenset()),
        gpu_run.Step("after-broken", "", [py, "-c", "print('never')"], 5, 10, needs=frozenset({"broken"})),
        gpu_run.Step("slow", "", [py, "-c", "import time; time.sleep(60)"], 1, 1),
        gpu_run.Step("too-big", "", [py, "-c", "print('never')"], 50, 60),
    ]
    facts = gpu_run.first_facts(1, None, None, "0123456789abcdef")
    out = tmp_path / "out"
    runner = gpu_run.Runner(steps, 20, out, tmp_path / "work", tmp_path / "site", facts, grace=1)
    start = time.monotonic()
    runner.run()
    assert time.monotonic() - start < 15
    status = {n: r["status"] for n, r in runner.results.items()}
    assert status == {"build": "ok", "junit": "failed (exit 1)", "broken": "failed (exit 3)",
                      "after-broken": "skipped (needs broken)", "slow": "timed out", "too-big": "skipped (no time)"}
    summary = json.loads((out / "summary.json").read_text())
    assert [s["name"] for s in summary["steps"]] == [s.name for s in steps]
    assert summary["steps"][1]["tests"] == {"passed": 1, "failed": 1, "skipped": 0}
    assert summary["commit"] == "0123456789abcdef" and summary["results_dir"].endswith("-nogpu-01234567")
    returned(out, gpu_run.FILE_CAP)
    log = (out / "gpu_run.log").read_text()
    assert "built" in log and "never" not in log and "all tests" in log
    with tarfile.open(out / "steps.tar.gz") as tar:
        assert "build/output.log" in tar.getnames()


def test_a_timed_out_step_ends_its_whole_process_tree():
    # The child starts a grandchild in a session of its own (as torchrun starts its ranks), then hangs.
    child = ("import subprocess, sys, time; "
             "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True); "
             "print(p.pid, flush=True); time.sleep(60)")
    start = time.monotonic()
    result = gpu_run.spawn([sys.executable, "-c", child], None, time.monotonic() + 2, lambda line: None, grace=1)
    assert result.rc is None and result.status == "timed out"
    assert time.monotonic() - start < 10
    grandchild = int(result.out.split()[0])
    time.sleep(0.5)
    assert grandchild not in gpu_run.process_table()


STOPPED_RUN = """
import signal, sys
from pathlib import Path
sys.path.insert(0, {bench!r})
import gpu_run
signal.signal(signal.SIGTERM, gpu_run.stop)
steps = [gpu_run.Step("hang", "", [sys.executable, "-c", "import os, time; print('hanging', os.getpid(), flush=True); "
                                                         "time.sleep(60)"], 1, 60, needs=frozenset()),
         gpu_run.Step("later", "", [sys.executable, "-c", "pass"], 1, 5, needs=frozenset())]
work = Path({work!r})
gpu_run.Runner(steps, 100, work / "out", work / "work", work / "site", gpu_run.first_facts(1, None, None, "c0ffee"),
               grace=1).run()
"""


def test_a_stopped_run_still_leaves_its_summary(tmp_path):
    run = subprocess.Popen([sys.executable, "-c", STOPPED_RUN.format(bench=str(SCRIPT.parent), work=str(tmp_path))],
                           stdout=subprocess.DEVNULL)
    log = tmp_path / "out" / "gpu_run.log"
    deadline = time.monotonic() + 30
    while not (log.exists() and re.search(r"^hanging \d+", log.read_text(), re.M)):
        assert time.monotonic() < deadline and run.poll() is None, "the run ended before its step started"
        time.sleep(0.1)
    run.terminate()
    run.wait(timeout=15)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    statuses = [(s["name"], s["status"]) for s in summary["steps"]]
    assert statuses == [("hang", "stopped (signal)"), ("later", "not reached")]
    text = log.read_text()
    assert "stopped by a signal" in text
    assert int(re.search(r"^hanging (\d+)", text, re.M)[1]) not in gpu_run.process_table()
    returned(tmp_path / "out", gpu_run.FILE_CAP)


def fake_mps_control(folder: Path, start_rc: int = 0) -> tuple[Path, Path]:
    """A stand-in nvidia-cuda-mps-control that notes each call in calls.txt (-d, or the command it reads
    from stdin) and exits with start_rc for -d."""
    control, calls = folder / "nvidia-cuda-mps-control", folder / "calls.txt"
    control.write_text(f'#!/bin/sh\nif [ "$1" = -d ]; then echo -d >> {calls}; exit {start_rc}; fi\n'
                       f'read cmd; echo "$cmd" >> {calls}\n')
    control.chmod(0o755)
    return control, calls


def mps_run(tmp_path, steps, start_rc=0):
    """Runs steps with MPS up (the stand-in above): returns (the calls it got, summary.json)."""
    control, calls = fake_mps_control(tmp_path, start_rc)
    facts = gpu_run.first_facts(1, None, None, "c0ffee")
    facts["mps"].update(started=True, detail="stand-in")
    runner = gpu_run.Runner(steps, 100, tmp_path / "out", tmp_path / "work", tmp_path / "site", facts, grace=1)
    runner.mps, runner.mps_control = {"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path / "pipe")}, str(control)
    runner.run()
    return calls.read_text().split(), json.loads((tmp_path / "out" / "summary.json").read_text())


def py_step(name: str, code: str, **kw):
    return gpu_run.Step(name, "", [sys.executable, "-c", code], 1, 10, needs=frozenset(), **kw)


RANK_LOG = ("import pathlib; p = pathlib.Path(r'{dir}/logs/run/attempt_0/1'); p.mkdir(parents=True); "
            "(p / 'stderr.log').write_text('symcomm: PE 1 timed out after 10 s waiting for a tile from PE 0')")


def test_mps_is_restarted_after_a_step_that_trapped(tmp_path):
    """A trap or fault under MPS ends every client of the server, and it takes no new ones: the next step
    must find a fresh daemon. Not after a plain test failure, which leaves the server as it was."""
    calls, summary = mps_run(tmp_path, [
        py_step("assertion", "raise SystemExit('AssertionError: 1 != 2')"),
        py_step("fault", "print('RuntimeError: CUDA error: an illegal memory access was encountered'); exit(1)"),
        py_step("rank-trap", RANK_LOG),  # the fault is in another rank's log; the step still passed
        py_step("trap", "pass", traps=True),  # passes by trapping in a child of its own
        py_step("clean", "print('nothing wrong')"),
    ])
    assert calls == ["quit", "-d"] * 3 + ["quit"], calls
    assert [(r["after"], r["why"], r["status"]) for r in summary["mps"]["restarts"]] == [
        ("fault", "its logs show 'CUDA error'", "ok"),
        ("rank-trap", "its logs show 'symcomm: PE 1 timed out'", "ok"),
        ("trap", "it traps on purpose", "ok")]
    assert "restarted after fault: ok" in (tmp_path / "out" / "gpu_run.log").read_text()


def test_the_steps_that_end_a_kernel_with_a_trap_say_so():
    # The single-process GPU tests trap on purpose, in processes of their own, and still pass.
    for call, rerun in ((1, "unreached"), (2, "unreached"), (2, "failed")):
        steps = gpu_run.plan(call, rerun)
        assert {s.name for s in steps if s.traps} == {s.name for s in steps} & {"single", "trap"}
    assert {s.name for s in gpu_run.plan(1) if s.traps} == {"single", "trap"}


def test_later_steps_run_without_mps_if_it_does_not_restart(tmp_path):
    pipe = "import os; print('pipe:', os.environ.get('CUDA_MPS_PIPE_DIRECTORY'))"
    calls, summary = mps_run(tmp_path, [py_step("before", pipe), py_step("trap", "pass", traps=True),
                                        py_step("after", pipe)], start_rc=1)
    assert calls == ["quit", "-d"], "a daemon that did not start is not stopped again"
    assert summary["mps"]["restarts"] == [{"after": "trap", "why": "it traps on purpose", "status": "failed (exit 1)"}]
    assert summary["mps"]["detail"].endswith("not restarted after trap (failed (exit 1)): later steps without it")
    with tarfile.open(tmp_path / "out" / "steps.tar.gz") as tar:
        before, after = (tar.extractfile(f"{name}/output.log").read().decode() for name in ("before", "after"))
    assert f"pipe: {tmp_path / 'pipe'}" in before and "pipe: None" in after
