#!/usr/bin/env bash
# Everything a GPU run needs, in one call on the (offline, one-GPU) GPU machine (design.md section 5):
#
#     bash bench/gpu_run.sh                 # from the repo root, with the carried .whl/ there
#     SYMCOMM_COMMIT=<sha> bash bench/gpu_run.sh   # .git does not travel: say which commit this is
#     bash bench/gpu_run.sh --digest        # here: the source digest a run there will report
#
# Steps: record the machine and versions, install the carried wheels, build the extension against
# the torch there, measure copy bandwidth and matmul rate, probe the MPG mode, start CUDA MPS, probe
# again, run the GPU test suites at world 1, 2, 4, run the benchmarks, stop MPS. A failing step is
# recorded and the run goes on. Each step has a time limit, all inside SYMCOMM_BUDGET_S (default
# 540 s of the tool's 600 s). What comes back ($OUT, at most 8 files, 2 folders deep):
#   gpu_run.log          everything printed (this script's whole output)
#   summary.json         machine, versions, per-step status and times, MPS/MPG, tests, benchmarks
#   artifacts.tar.gz     junit XMLs and per-rank logs of the tests, all benchmark outputs, MPS logs
#   bench/               up to 5 benchmark files (PNG first, then JSON); all of them are in the tarball
# The last thing printed is a short summary table (the tool returns the last 12,000 characters).
#
# Knobs (environment): OUT (default ./out), PYTHON (python3), SYMCOMM_SITE (/tmp/site: where the
# wheels and symcomm are installed), SYMCOMM_BUDGET_S (540), SYMCOMM_TEST_WORLDS (1,2,4),
# SYMCOMM_BENCH_WORLDS (1,2), SYMCOMM_BENCH_OPS (all-reduce,all-to-all,moe,tp-layer,gemm), SYMCOMM_BENCH_ARGS
# (--algorithms --max-bytes 64M), SYMCOMM_MPS (1; 0 = don't try).
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1

# The digest of the sources that travel: compare `bash bench/gpu_run.sh --digest` here with the
# run's summary.json to know the run built exactly the committed tree.
source_digest() {
  find CMakeLists.txt pyproject.toml csrc python tests bench -type f \
    ! -path '*/__pycache__/*' ! -name '*.pyc' ! -name '*.so' ! -path '*.egg-info/*' ! -path 'bench/results/*' \
    -print0 2>/dev/null | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16
}
if [[ ${1:-} == --digest ]]; then source_digest; exit 0; fi

OUT=${OUT:-$PWD/out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
SITE=${SYMCOMM_SITE:-/tmp/site}
BUDGET_S=${SYMCOMM_BUDGET_S:-540}
TEST_WORLDS=${SYMCOMM_TEST_WORLDS:-1,2,4}
BENCH_WORLDS=${SYMCOMM_BENCH_WORLDS:-1,2}
BENCH_OPS=${SYMCOMM_BENCH_OPS:-all-reduce,all-to-all,moe,tp-layer,gemm}
read -ra BENCH_ARGS <<<"${SYMCOMM_BENCH_ARGS:---algorithms --max-bytes 64M}"
WORK=$(mktemp -d /tmp/gpurun.XXXXXX)
STATE=$WORK/state.tsv        # "key<TAB>value" lines; the last one of a key wins
MPS_PIPE=/tmp/mps-pipe       # the MPS daemon and its clients must agree on this directory
MPS_LOGS=/tmp/mps-log
MPS_UP=""                    # set while our MPS control daemon runs
MPS_PID=""
MPS_CONTROL=""
export OUT WORK              # read by the summary writer
export PYTHONUNBUFFERED=1    # rank output reaches the log as it happens, also when a step is killed
export PYTHONDONTWRITEBYTECODE=1
# Several PEs on one GPU: no NVLink switch to multicast through, no network transport to load
# (symcomm.runtime sets these too when ranks share a GPU; set here so every process sees them).
# NVSHMEM_SYMMETRIC_SIZE stays at NVSHMEM's default (1 GiB per PE): 4 PEs need ~4 GiB of the GPU.
export NVSHMEM_DISABLE_NVLS=${NVSHMEM_DISABLE_NVLS:-1}
export NVSHMEM_REMOTE_TRANSPORT=${NVSHMEM_REMOTE_TRANSPORT:-none}
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}

# ---------------------------------------------------------------------------------------- helpers
log() { printf '\n[%s +%ds] %s\n' "$(date -u +%H:%M:%S)" "$SECONDS" "$*"; }
put() { printf '%s\t%s\n' "$1" "${2//$'\n'/ }" >>"$STATE"; }
left() { echo $((BUDGET_S - SECONDS)); }
# allow CAP RESERVE: seconds a step may take: CAP, but never eating the RESERVE kept for later steps.
allow() { local t=$(($(left) - $2)); echo $((t < $1 ? t : $1)); }
status_of() { case $1 in 0) echo ok ;; 124 | 137) echo "timed out" ;; 99) echo "skipped (no time)" ;; *) echo "failed (exit $1)" ;; esac; }

# step NAME LIMIT CMD...: runs CMD with a time limit; its output goes to $WORK/NAME.out (in the
# tarball) and, up to 2 MB a step so that gpu_run.log stays under the 16 MiB a file may have, to
# stdout (so to the log); records NAME's status and seconds. Returns CMD's exit code (99: not run).
step() {
  local name=$1 limit=$2 t=$SECONDS rc
  shift 2
  if ((limit < 10)); then
    log "$name: skipped, only $(left) s of the budget left"
    put "step.$name" "skipped (no time)|0"
    return 99
  fi
  log "$name (limit ${limit} s): $*"
  # -k: torchrun needs a moment after SIGTERM to stop its ranks (they run in their own sessions).
  timeout -k 20 "$limit" "$@" 2>&1 | tee "$WORK/$name.out" | awk -v max=2000000 -v name="$name" '
    { n += length($0) + 1 }
    n <= max { print; fflush(); next }
    !cut { print "... (output cut here; all of it is " name ".out in artifacts.tar.gz)"; fflush(); cut = 1 }'
  rc=${PIPESTATUS[0]}
  put "step.$name" "$(status_of "$rc")|$((SECONDS - t))"
  log "$name: $(status_of "$rc") in $((SECONDS - t)) s"
  summary >/dev/null
  return "$rc"
}

# A rank that outlived its torchrun (killed at a time limit) would spin on the GPU and spoil every
# later step: end any python process still holding the GPU. Everything on this machine is ours.
reap_gpu() {
  local pid rest
  command -v nvidia-smi >/dev/null || return 0
  while IFS=', ' read -r pid rest; do
    if ! [[ $pid =~ ^[0-9]+$ ]] || ! grep -qa python "/proc/$pid/cmdline" 2>/dev/null; then continue; fi
    log "leftover GPU process $pid ($rest): ending it"
    kill "$pid" 2>/dev/null
    sleep 3
    kill -9 "$pid" 2>/dev/null
  done < <(timeout 20 nvidia-smi --query-compute-apps=pid,process_name --format=csv,noheader 2>/dev/null)
}

mps_ctl() { CUDA_MPS_PIPE_DIRECTORY=$MPS_PIPE CUDA_MPS_LOG_DIRECTORY=$MPS_LOGS timeout 20 "$MPS_CONTROL" "$@"; }

mps_stop() {
  [[ -n $MPS_UP ]] || return 0
  log "stopping MPS (control daemon ${MPS_PID:-pid unknown})"
  echo quit | mps_ctl
  if [[ -n $MPS_PID ]]; then
    for _ in $(seq 20); do kill -0 "$MPS_PID" 2>/dev/null || break; sleep 1; done
    if kill -0 "$MPS_PID" 2>/dev/null; then
      log "MPS control daemon $MPS_PID ignored quit: ending it"
      kill "$MPS_PID"
    fi
  fi
  put mps.stopped yes
  MPS_UP=""
  unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
}

# A run killed at the tool's limit cannot do this; a clean or failing one does, so no daemon and no
# rank outlives the call (a daemon would otherwise run on while the machine stays warm).
# shellcheck disable=SC2317  # called by the EXIT trap
cleanup() { mps_stop; reap_gpu; }

summary() { "$PY" "$WORK/summary.py" "$@"; }

# --------------------------------------------------------------------- small python helpers (files)
write_helpers() {
  # Versions of everything that matters, as Python sees them (after the carried wheels are in).
  cat >"$WORK/versions.py" <<'EOF'
import importlib.metadata as md, json, platform, sys
names = ["torch", "nvidia-nvshmem-cu13", "nvshmem4py-cu13", "cuda-python", "cuda-bindings", "cuda-core",
         "cuda-pathfinder", "numpy", "cython", "pytest", "pytest-timeout", "expecttest", "scikit-build-core",
         "pybind11", "matplotlib", "rich"]
info = {"python": platform.python_version(), "python_exe": sys.executable, "packages": {}}
for n in names:
    try:
        info["packages"][n] = md.version(n)
    except md.PackageNotFoundError:
        info["packages"][n] = None
import torch
info["torch_cuda"] = torch.version.cuda
info["cuda_available"] = torch.cuda.is_available()
if info["cuda_available"]:
    p = torch.cuda.get_device_properties(0)
    info.update(device_name=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                memory_gib=round(p.total_memory / 2**30, 1), device_count=torch.cuda.device_count())
try:
    import nvshmem.core
    v = nvshmem.core.get_version()
    info["nvshmem4py"], info["libnvshmem_loaded"] = v.nvshmem4py_version, v.libnvshmem_version
except Exception as e:  # recorded, not fatal: the nvshmem backend then fails its own steps
    info["nvshmem4py_error"] = f"{type(e).__name__}: {e}"
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(json.dumps(info, indent=1))
EOF

  # The extension just built: it must come from $SITE, not from some other installed copy.
  cat >"$WORK/extension.py" <<'EOF'
import json, os, sys
import symcomm, symcomm.runtime as r
m = r.load_extension()
if not os.path.realpath(m.__file__).startswith(os.path.realpath(sys.argv[2]) + os.sep):
    sys.exit(f"symcomm._C was imported from {m.__file__}, not from the fresh build in {sys.argv[2]}")
info = {"module": m.__file__, "nvshmem_version": ".".join(map(str, m.nvshmem_version)),
        "cuda_version": m.cuda_version, "cuda_archs": m.cuda_archs}
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(json.dumps(info, indent=1))
EOF

  # The two ceilings (METHOD.md), measured by the same code that heads every benchmark table.
  cat >"$WORK/calibrate.py" <<'EOF'
import json, sys, torch
from symcomm.bench.harness import ceilings
info = {k: round(v, 1) for k, v in ceilings(torch.device("cuda")).items()}
json.dump(info, open(sys.argv[1], "w"))
print(info)
EOF

  # The MPG mode NVSHMEM reports at 2 PEs on the one GPU: 3 = limited, 4 = full (design.md section 4).
  cat >"$WORK/mpg_probe.py" <<'EOF'
import os
import symcomm
from symcomm.runtime import mpg_status
symcomm.init(backend="nvshmem")
try:
    import nvshmem.core
    print(f"MPG rank={symcomm.rank()} world={symcomm.world_size()} status={mpg_status()} "
          f"nvshmem4py_status={int(nvshmem.core.init_status())} "
          f"mps_pct={os.environ.get('CUDA_MPS_ACTIVE_THREAD_PERCENTAGE', '-')}", flush=True)
finally:
    symcomm.finalize()
EOF

  # summary.json from the state file and the steps' outputs; --print also prints the table.
  cat >"$WORK/summary.py" <<'EOF'
import json, os, re, sys
from pathlib import Path
work, out = Path(os.environ["WORK"]), Path(os.environ["OUT"])
state = {}
for line in (work / "state.tsv").read_text().splitlines():
    key, _, value = line.partition("\t")
    state[key] = value
def load(name):
    try:
        return json.loads((work / name).read_text())
    except (OSError, ValueError):
        return {}
def text(name):
    try:
        return (work / name).read_text(errors="replace")
    except OSError:
        return ""
versions, ext, calib = load("versions.json"), load("extension.json"), load("calibrate.json")
steps = {}
for key, value in state.items():
    if key.startswith("step."):
        status, _, seconds = value.rpartition("|")
        steps[key[5:]] = {"status": status, "seconds": int(seconds or 0)}
def mpg(name):
    if name not in steps:
        return "not run"
    found = re.findall(r"MPG rank=\d+ world=\d+ status=(\S+)", text(name + ".out"))
    if steps[name]["status"].startswith("skipped"):
        return "not run (no time)"
    if not found:
        return f"error ({steps[name]['status']})"
    codes = sorted(set(found))
    names = {"3": "limited", "4": "full"}
    return ", ".join(f"{names.get(c, 'status')} ({c})" for c in codes) + ("" if len(codes) == 1 else " (ranks disagree)")
# run.py prints "=== NAME: P passed, F failed, S skipped in T s [ok | FAILED | FAILED why]" per suite.
tests = {}
for name in [n for n in steps if n.startswith("tests-w")]:
    for m in re.finditer(r"^=== ([^:\n]+): (\d+) passed, (\d+) failed, (\d+) skipped in (\d+) s \[(.*)\]$",
                         text(name + ".out"), re.M):
        tests.setdefault(m[1], {"passed": int(m[2]), "failed": int(m[3]), "skipped": int(m[4]),
                                "seconds": int(m[5]), "status": m[6]})
    world = f"gpu world {name[len('tests-w'):]}"
    tests.setdefault(world, {"passed": 0, "failed": 0, "skipped": 0, "seconds": steps[name]["seconds"],
                             "status": f"FAILED no result ({steps[name]['status']})"})
totals = {k: sum(t[k] for t in tests.values()) for k in ("passed", "failed", "skipped")}
# As run.py counts: a suite that crashed or timed out is one more failure.
totals["failed"] += sum(t["status"] not in ("ok", "FAILED") for t in tests.values())
bench = {name[6:]: dict(steps[name]) for name in steps if name.startswith("bench-")}
# Each benchmark's JSON (symcomm.bench writes <op>-w<N>.json): backend, correctness, the largest size.
for path in sorted((work / "bench").glob("*.json")):
    try:
        data = json.loads(path.read_text())
        rows, head = data.get("rows", []), data.get("header", {})
        entry = bench.setdefault(path.stem, {"status": "?", "seconds": 0})
        entry.update(backend=head.get("backend"), pg_backend=head.get("pg_backend"), rows=len(rows),
                     all_correct=all(r.get("correct", False) for r in rows))
        if rows:
            big = max(rows, key=lambda r: r.get("bytes", 0))
            entry["largest"] = {k: big.get(k) for k in ("bytes", "dtype", "time_us", "busbw_gbs", "baseline_us", "speedup")}
    except (OSError, ValueError, AttributeError, TypeError) as e:
        bench.setdefault(path.stem, {})["json_error"] = f"{type(e).__name__}: {e}"
gpu = state.get("gpu", "")
short = state.get("commit", "")[:8] or "unknown"
slug = (re.findall(r"\b([a-z]\d{3})\b", gpu.lower()) or [re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-") or "nogpu"])[0]
packages = versions.get("packages", {})
summary = {
    "commit": state.get("commit") or None, "commit_source": state.get("commit_source"),
    "source_digest": state.get("digest"), "date_utc": state.get("date"),
    "results_dir": f"bench/results/{state.get('date', '')[:10]}-{slug}-{short}",
    "gpu": gpu or None, "driver": state.get("driver") or None, "gpu_memory": state.get("gpu_memory") or None,
    "kernel": state.get("kernel"), "nvcc": state.get("nvcc") or None, "python": versions.get("python"),
    "torch": packages.get("torch"), "torch_cuda": versions.get("torch_cuda"),
    "nvshmem": packages.get("nvidia-nvshmem-cu13"), "libnvshmem_loaded": versions.get("libnvshmem_loaded"),
    "nvshmem4py": packages.get("nvshmem4py-cu13"), "nvshmem4py_error": versions.get("nvshmem4py_error"),
    "packages": packages, "device": {k: versions.get(k) for k in ("device_name", "capability", "sms", "memory_gib")},
    "build": {**steps.get("build", {"status": "not run", "seconds": 0}), "extension": ext},
    "needed_libraries": state.get("needed", "").split() or None,
    "calibration": calib or None,
    "mps": {"started": state.get("mps.started") == "yes", "detail": state.get("mps.detail", "not tried"),
            "stopped": state.get("mps.stopped") == "yes"},
    "mpg": {"without_mps": mpg("mpg-nomps"), "with_mps": mpg("mpg-mps")},
    "tests": tests, "tests_total": totals, "bench": bench, "steps": steps,
    "budget_s": int(state.get("budget", 0)), "elapsed_s": int(state.get("elapsed", 0)) or None,
    "files": sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()),
}
(out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
if "--print" not in sys.argv:
    sys.exit()
print("\n" + "=" * 30 + " symcomm GPU run summary " + "=" * 30)
row = lambda k, v: print(f"{k:<12}{v}")
row("commit", f"{summary['commit'] or 'unknown'} ({summary['commit_source']}), source digest {summary['source_digest']}")
row("date", f"{summary['date_utc']}  -> commit the files under {summary['results_dir']}/")
row("gpu", f"{gpu}, driver {summary['driver']}, {summary['gpu_memory']}, sm {versions.get('capability')}, "
           f"{versions.get('sms')} SMs" if gpu else "none visible (nvidia-smi found no GPU)")
row("software", f"torch {summary['torch']} (CUDA {summary['torch_cuda']}), nvshmem wheel {summary['nvshmem']} "
                f"(loaded {summary['libnvshmem_loaded']}), nvshmem4py {summary['nvshmem4py']}, nvcc {summary['nvcc']}, "
                f"python {summary['python']}")
row("", "cuda-bindings {cuda-bindings}, cuda-core {cuda-core}, cuda-pathfinder {cuda-pathfinder}, cuda-python {cuda-python}, "
        "scikit-build-core {scikit-build-core}".format(**{k: packages.get(k) for k in
        ("cuda-bindings", "cuda-core", "cuda-pathfinder", "cuda-python", "scikit-build-core")}))
if summary["nvshmem4py_error"]:
    row("", f"nvshmem4py import failed: {summary['nvshmem4py_error']}")
b = summary["build"]
row("build", f"{b['status']} in {b['seconds']} s" + (f"; _C built against NVSHMEM {ext.get('nvshmem_version')}, "
             f"CUDA {ext.get('cuda_version')}, archs {ext.get('cuda_archs')}" if ext else "; extension not importable"))
if summary["needed_libraries"]:
    row("", "NEEDED " + " ".join(summary["needed_libraries"]))
if calib:
    row("ceilings", f"device-to-device copy {calib['d2d_copy_gbs']} GB/s (read+write), "
                    f"bf16 8192^3 matmul {calib['bf16_matmul_tflops']} TFLOP/s")
row("mps", f"{'started' if summary['mps']['started'] else 'not started'}: {summary['mps']['detail']}")
row("mpg", f"without MPS: {summary['mpg']['without_mps']}; with MPS (50% per PE): {summary['mpg']['with_mps']}")
for name, t in tests.items():
    row("tests", f"{name:<12} {t['passed']:4d} passed {t['failed']:3d} failed {t['skipped']:3d} skipped {t['seconds']:4d} s  {t['status']}")
row("tests", f"{'total':<12} {totals['passed']:4d} passed {totals['failed']:3d} failed {totals['skipped']:3d} skipped")
for name, s in bench.items():
    line = f"{name:<16} {s.get('status')} in {s.get('seconds')} s"
    if "rows" in s:
        line += f"; backend {s['backend']}, {s['rows']} sizes, {'all correct' if s['all_correct'] else 'INCORRECT rows'}"
    big = s.get("largest")
    if big:
        f = lambda v, spec: format(v, spec) if isinstance(v, (int, float)) else str(v)
        line += (f"; at {big['bytes']} B {big['dtype']}: {f(big['time_us'], '.1f')} us, busbw {f(big['busbw_gbs'], '.1f')} GB/s,"
                 f" {f(big['speedup'], '.2f')}x the baseline")
    row("bench", line)
row("steps", ", ".join(f"{n} {s['status']} {s['seconds']}s" for n, s in steps.items()))
row("time", f"{summary['elapsed_s']} s of a {summary['budget_s']} s budget")
row("files", ", ".join(summary["files"]))
EOF
}

# ------------------------------------------------------------------------------------------- main
main() {
  trap cleanup EXIT
  trap 'exit 143' TERM INT
  : >"$STATE"
  write_helpers
  put budget "$BUDGET_S"
  log "symcomm GPU run: OUT=$OUT WORK=$WORK budget ${BUDGET_S} s"

  # --- 1. What this run is and where it runs. .git usually does not travel with the working tree,
  # so the caller names the commit (SYMCOMM_COMMIT=...); git and a COMMIT file are fallbacks.
  local commit=${SYMCOMM_COMMIT:-} source=SYMCOMM_COMMIT
  if [[ -z $commit ]] && commit=$(git rev-parse HEAD 2>/dev/null); then
    source=git
    [[ -n $(git status --porcelain --untracked-files=no 2>/dev/null) ]] && source="git, uncommitted changes"
  fi
  if [[ -z $commit && -f COMMIT ]]; then commit=$(tr -dc '0-9a-f' <COMMIT | head -c 40); source="COMMIT file"; fi
  [[ -z $commit ]] && source="unknown: set SYMCOMM_COMMIT"
  put commit "$commit"
  put commit_source "$source"
  put digest "$(source_digest)"
  put date "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  put kernel "$(uname -sr)"
  log "commit ${commit:-unknown} ($source), source digest $(source_digest)"
  if command -v nvidia-smi >/dev/null; then
    timeout 30 nvidia-smi
    local q
    q=$(timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -n 1)
    put gpu "${q%%,*}"
    q=${q#*, }
    put driver "${q%%,*}"
    put gpu_memory "${q#*, }"
  else
    log "no nvidia-smi on this machine"
  fi
  local nvcc
  nvcc=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
  "$nvcc" --version && put nvcc "$("$nvcc" --version | sed -n 's/.*release \([0-9.]*\), V\([0-9.]*\).*/\2/p')"
  "$PY" --version

  # --- 2. Carried wheels (bench/fetch_wheels.sh): nvshmem4py etc. go to $SITE, ahead on sys.path.
  mkdir -p "$SITE"
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  if compgen -G ".whl/*.whl" >/dev/null; then
    step wheels 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target "$SITE" .whl/*.whl
  else
    log "no .whl/ here: nothing carried (name .whl in the tool's carry; see docs/gpu-machine.md)"
  fi
  step versions 60 "$PY" "$WORK/versions.py" "$WORK/versions.json"

  # --- 3. Build against the torch and NVSHMEM wheel that are here. No internet, so no build
  # isolation; build outside the tree; a stale symcomm from an earlier call must not mask a failure.
  rm -rf "$SITE/symcomm" "$SITE"/symcomm-*.dist-info
  step build "$(allow 300 200)" "$PY" -m pip install -v --no-build-isolation --no-deps --no-cache-dir --upgrade \
    --target "$SITE" -C build-dir="$WORK/build" .
  if step extension 60 "$PY" "$WORK/extension.py" "$WORK/extension.json" "$SITE"; then
    local so
    so=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["module"])' "$WORK/extension.json")
    if command -v readelf >/dev/null; then
      readelf -d "$so" | grep NEEDED
      put needed "$(readelf -d "$so" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p' | tr '\n' ' ')"
    else
      ldd "$so"
    fi
  fi

  # --- 4. The machine's two ceilings, with the GPU to ourselves (before MPS).
  step calibrate "$(allow 60 300)" "$PY" "$WORK/calibrate.py" "$WORK/calibrate.json"
  reap_gpu

  # --- 5. MPG mode without MPS (expected: limited, 3), then MPS, then MPG mode with it.
  local torchrun=("$PY" -m torch.distributed.run --standalone)
  step mpg-nomps "$(allow 90 240)" "${torchrun[@]}" --nproc-per-node 2 "$WORK/mpg_probe.py"
  reap_gpu
  MPS_CONTROL=$(command -v nvidia-cuda-mps-control || ls /usr/local/nvidia/bin/nvidia-cuda-mps-control 2>/dev/null)
  if [[ ${SYMCOMM_MPS:-1} == 0 ]]; then
    put mps.detail "not tried (SYMCOMM_MPS=0)"
  elif [[ -z $MPS_CONTROL ]]; then
    put mps.detail "nvidia-cuda-mps-control not found"
  else
    log "starting MPS: $MPS_CONTROL -d (pipes in $MPS_PIPE, logs in $MPS_LOGS)"
    mkdir -p "$MPS_PIPE" "$MPS_LOGS"
    # A daemon left by an earlier call on this (still warm) machine would refuse a second one.
    echo quit | mps_ctl >/dev/null 2>&1 && sleep 2
    # The daemon must not hold our stdout: `tee` would then wait for it to end.
    if mps_ctl -d </dev/null >"$WORK/mps-start.out" 2>&1; then
      cat "$WORK/mps-start.out"
      MPS_UP=1
      sleep 1
      MPS_PID=$(cat "$MPS_PIPE/nvidia-cuda-mps-control.pid" 2>/dev/null || pgrep -o -x nvidia-cuda-mps-control)
      log "MPS control daemon pid ${MPS_PID:-?}"
      # The daemon starts a server only for the first client: a failing server shows up here.
      local rc
      CUDA_MPS_PIPE_DIRECTORY=$MPS_PIPE step mps-client "$(allow 60 200)" "$PY" -c \
        'import torch; x = torch.ones(1 << 20, device="cuda"); torch.cuda.synchronize(); print("MPS client ok", int(x.sum()))'
      rc=$?
      if ((rc == 0)); then
        local servers
        servers=$(echo get_server_list | mps_ctl | xargs)
        put mps.started yes
        put mps.detail "control daemon ${MPS_PID:-?}, server(s) ${servers:-none listed}"
        # tests/run.py keys per-PE CUDA_MPS_ACTIVE_THREAD_PERCENTAGE off this variable.
        export CUDA_MPS_PIPE_DIRECTORY=$MPS_PIPE CUDA_MPS_LOG_DIRECTORY=$MPS_LOGS
      else
        put mps.detail "daemon started but a CUDA client $(status_of "$rc") under it: MPS stopped, runs go on without it"
        mps_stop
      fi
    else
      put mps.detail "nvidia-cuda-mps-control -d failed"
    fi
  fi
  if [[ -n $MPS_UP ]]; then
    CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=50 step mpg-mps "$(allow 90 200)" "${torchrun[@]}" --nproc-per-node 2 "$WORK/mpg_probe.py"
    reap_gpu
  fi

  # --- 6. GPU test suites, one world size at a time so that each gets a fair share of what is left
  # (a quick world leaves more to the next). run.py's own limit (per suite it runs) ends its
  # torchrun's process group; the outer one, 20 s later, is only a backstop.
  local worlds bench_worlds ops n_bench reserve w i share inner suites no_single=() single=()
  IFS=, read -ra worlds <<<"$TEST_WORLDS"
  IFS=, read -ra bench_worlds <<<"$BENCH_WORLDS"
  IFS=, read -ra ops <<<"$BENCH_OPS"
  n_bench=$((${#bench_worlds[@]} * ${#ops[@]}))
  reserve=$((n_bench * 60 + 20))
  # run.py --gpu only also runs the single-process gpu suite: once is enough, where it can be skipped.
  "$PY" tests/run.py --help 2>/dev/null | grep -q -- --no-single && no_single=(--no-single)
  for i in "${!worlds[@]}"; do
    w=${worlds[i]}
    share=$((($(left) - reserve) / (${#worlds[@]} - i)))
    suites=$((${#single[@]} ? 1 : 2))   # the world's suite, and the single-process one unless skipped
    inner=$(((share > 40 ? share - 20 : share / 2) / suites))
    step "tests-w$w" "$share" "$PY" tests/run.py --gpu only --worlds "$w" --timeout "$inner" \
      --keep "$WORK/tests/w$w" "${single[@]}"
    reap_gpu
    single=("${no_single[@]}")
  done

  # --- 7. Benchmarks, each rank with an equal share of the SMs under MPS, and a workspace that holds
  # the fused GEMM's largest partial product (8192 x 8192 bf16 = 128 MiB) in one piece.
  mkdir -p "$WORK/bench"
  local op
  i=0
  for op in "${ops[@]}"; do
    for w in "${bench_worlds[@]}"; do
      share=$((($(left) - 20) / (n_bench - i)))
      i=$((i + 1))
      SYMCOMM_WORKSPACE_BYTES=$((288 << 20)) CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=$((100 / w)) step "bench-$op-w$w" "$share" \
        "${torchrun[@]}" --nproc-per-node "$w" -m symcomm.bench "$op" "${BENCH_ARGS[@]}" --out "$WORK/bench"
      reap_gpu
    done
  done

  # --- 8. Stop MPS, bundle what does not fit the 8 files that come back, write the summary.
  mps_stop
  if compgen -G "$MPS_LOGS/*.log" >/dev/null; then
    cp -r "$MPS_LOGS" "$WORK/mps-log"
    tail -n 8 "$MPS_LOGS"/*.log   # all of them are in the tarball
  fi
  (cd "$WORK" && tar -czf "$OUT/artifacts.tar.gz" --ignore-failed-read tests bench mps-log ./*.out ./*.json 2>/dev/null)
  mkdir -p "$OUT/bench"
  # PNGs first, then JSONs: 5 files here + the 3 above = the 8 that come back.
  find "$WORK/bench" -maxdepth 1 \( -name '*.png' -o -name '*.json' \) -printf '%f\n' | sort -t. -k2,2r -k1,1 |
    head -n 5 | while read -r f; do cp "$WORK/bench/$f" "$OUT/bench/"; done
  put elapsed "$SECONDS"
  summary --print
}

main "$@" 2>&1 | tee "$OUT/gpu_run.log"
rc=${PIPESTATUS[0]}
rm -rf "$WORK"
exit "$rc"
