"""Shows that the suites fail when the code is wrong: each mutation below is a plausible bug, planted
in a scratch copy of the sources, and the tests named with it must fail.

- In csrc/: the emulated module is built from the copy and the emulated-kernel suites run on it.
- In python/symcomm/: the copy is imported in place of the installed package, and the tests run
  under torchrun at world 2 on the torch backend (the host-side stand-ins and the op tests).
- Marked "emulated": the GPU suites run under torchrun at world 2 on the nvshmem backend on the
  emulated device, built from the (mutated) csrc/: bindings, host side and kernels together; marked
  "emulated rma" or "emulated 2 nodes", as that run of tests/run.py's EMULATED_RUNS (the remote path
  forced; 2 emulated nodes of 2 PEs).
- Marked "nvcc": the translation units named in place of the tests are compiled from the (mutated) csrc/
  with nvcc as CMakeLists.txt compiles them, and tests/device_code.py's checks of the compiled orderings
  and of the GEMM core run on the objects (each unit is first compiled unmutated, where they must pass).
- Marked "device_code": the tests run in one process on the (mutated) python/, beside the installed _C.

    python3 tests/mutations.py            # every mutation; exit 1 if any went unnoticed
    python3 tests/mutations.py -k owner   # those whose name contains "owner"
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import device_code
import emu_harness
from run import EMULATED_RUNS, EMULATED_WORKSPACE_BYTES

ROOT = Path(__file__).resolve().parents[1]

# name: (file, the exact text, what it becomes, the tests that must notice[, "tsan": under
# ThreadSanitizer, for orderings that the emulation's x86 host would otherwise forgive; "emulated": the
# GPU suites on the emulated device, "emulated rma" / "emulated 2 nodes" as those EMULATED_RUNS; "nvcc":
# in place of the tests, the translation units whose machine code must show it; "device_code": the tests
# in one process])
MUTATIONS = {
    "two-shot without its middle barrier": (
        "csrc/collectives/collectives.cu", "  s.meet(peers);  // every share is reduced\n", "",
        "test_emu_collectives.py -k two_shot"),
    "a wait that accepts the previous flag (off by one)": (
        "csrc/core/wait.cuh", "while ((seen = load_acquire_sys(flag)) < target)",
        "while ((seen = load_acquire_sys(flag)) + 1 < target)", "test_emu_collectives.py -k back_to_back"),
    "one-shot reduce that does not wait for its peers at the end": (
        "csrc/collectives/collectives.cu", "sum_range<T, N>(src, a.npes, reinterpret_cast<T*>(a.dst), lo, hi);\n  s.close();",
        "sum_range<T, N>(src, a.npes, reinterpret_cast<T*>(a.dst), lo, hi);\n  s.save();",
        "test_emu_collectives.py -k back_to_back"),
    "the last block drops the remainder": (
        "csrc/collectives/collectives.cu", "hi = blockIdx.x + 1 == gridDim.x ? len : units", "hi = units",
        "test_emu_collectives.py -k reductions"),
    "the scalar tail skips an element": (
        "csrc/collectives/collectives.cu", "for (std::int64_t i = vec_hi + threadIdx.x; i < hi; i += blockDim.x) {",
        "for (std::int64_t i = vec_hi + 1 + threadIdx.x; i < hi; i += blockDim.x) {",
        "test_emu_collectives.py -k reductions"),
    "gather picks its unit from the destination only": (
        "csrc/collectives/collectives.cu",
        "const std::uintptr_t align = reinterpret_cast<std::uintptr_t>(src) | reinterpret_cast<std::uintptr_t>(dst);",
        "const std::uintptr_t align = reinterpret_cast<std::uintptr_t>(dst);", "test_emu_collectives.py -k gather"),
    "fused all-reduce: wrong tile owner for the copiers": (
        "csrc/gemm/gemm.cu", "const int owner = t % a.npes;", "const int owner = (t + 1) % a.npes;",
        "test_emu_gemm.py -k all_reduce"),
    "fused reduce-scatter misses the tile its first rows straddle": (
        "csrc/gemm/gemm.cu", "const int first = lo / kTileM,", "const int first = (lo + kTileM - 1) / kTileM,",
        "test_emu_gemm.py -k reduce_scatter"),
    "all-gather + GEMM tags its own bands as PE 0's": (
        "csrc/gemm/gemm.cu", "band_index(i, a.me, tiles_m)", "band_index(i, 0, tiles_m)", "test_emu_gemm.py -k all_gather"),
    "fused GEMM calls share one tag": (
        "csrc/gemm/gemm.cu", "{ ++*ws.gemm_epoch(); }", "{ *ws.gemm_epoch() = 1; }", "test_emu_gemm.py -k back_to_back"),
    "MoE slots: higher PEs' pairs first": (
        "csrc/moe/moe.cu", "for (int src = 0; src < me; ++src) slot +=", "for (int src = me + 1; src < a.npes; ++src) slot +=",
        "test_emu_moe.py"),
    "MoE expert counts miss the last PE": (
        "csrc/moe/moe.cu", "for (int src = 0; src < a.npes; ++src) total +=", "for (int src = 0; src + 1 < a.npes; ++src) total +=",
        "test_emu_moe.py"),
    "MoE combine ignores the weights": (
        "csrc/moe/moe.cu", "acc[n] += w[j] * static_cast<float>(r.v[n]);", "acc[n] += static_cast<float>(r.v[n]);",
        "test_emu_moe.py"),
    "the remote path puts into the receiver's slot instead of the sender's": (
        "csrc/collectives/collectives.cu", "nvshmemx_putmem_signal_block(inbox + my_index * slot_bytes + from,",
        "nvshmemx_putmem_signal_block(inbox + q * slot_bytes + from,", "test_emu_collectives.py -k remote_path"),
    "the remote path puts into the slot of its PE number, not of its place in the team": (
        "csrc/collectives/collectives.cu", "nvshmemx_putmem_signal_block(inbox + my_index * slot_bytes + from,",
        "nvshmemx_putmem_signal_block(inbox + me * slot_bytes + from,", "test_emu_collectives.py -k hierarchical"),
    "the remote path reads its inbox before the puts are in": (
        "csrc/collectives/collectives.cu",
        '    wait_signal(&a.ws.slot(blockIdx.x, pe)->flag, seq, "a put", pe);\n', "",
        "test_emu_collectives.py -k remote_path"),
    # NVSHMEM's delivery order, which the emulation keeps and no better (csrc/emu/rma.cpp).
    "the remote path's barrier signals are not fenced after the puts they close": (
        "csrc/core/workspace.cuh", "  if (rma)\n    fence_block();\n  else\n    __syncthreads();\n", "  __syncthreads();\n",
        "test_emu_collectives.py -k remote_path"),
    "the ring's signal is not fenced after the previous call's": (
        "csrc/core/sanity.cu", "  fence_block();\n  nvshmemx_putmem_signal_block(", "  nvshmemx_putmem_signal_block(",
        "test_emu_sanity.py -k ring"),
    "the remote path's waits skip NVSHMEM's consistency step": (
        "csrc/core/wait.cuh", "  nvshmem_signal_wait_until(flag, NVSHMEM_CMP_GE, target);\n", "",
        "test_emu_collectives.py -k remote_path"),
    "the MoE remote path's combine reads the rows it fetched without a quiet": (
        "csrc/moe/moe.cu", "                                 owner);\n      }\n    }\n    s.quiet();\n",
        "                                 owner);\n      }\n    }\n", "test_emu_moe.py -k rma"),
    "the remote path lets a sender refill the inbox being read": (
        "csrc/collectives/collectives.cu",
        "for (int q = 0; q < t.size; ++q) copy_bytes(inbox + q * slot_bytes, a.dst + q * a.dst_pitch, lo, hi);\n  }\n  s.close();",
        "for (int q = 0; q < t.size; ++q) copy_bytes(inbox + q * slot_bytes, a.dst + q * a.dst_pitch, lo, hi);\n  }\n  s.save();",
        "test_emu_collectives.py -k back_to_back"),
    "a flag store without release ordering": (
        "csrc/core/memory.cuh", "__atomic_store_n(p, v, __ATOMIC_RELEASE);", "__atomic_store_n(p, v, __ATOMIC_RELAXED);",
        "test_emu_collectives.py -k reductions", "tsan"),
    # The host side.
    "fused path without the join": (
        "python/symcomm/gemm.py", "    main.wait_stream(side)\n", "", "test_gemm_plan.py"),
    "fused path without the fork": (
        "python/symcomm/gemm.py", "    side.wait_stream(main)\n", "", "test_gemm_plan.py"),
    "fused all-reduce's reduced tiles on top of its partial sums": (
        "python/symcomm/gemm.py", "return Plan(rows, _up(rows * n * isz, _ALIGN))", "return Plan(rows, 0)",
        "test_gemm_plan.py -k gemm_all_reduce"),
    "the GEMM keeps the comm kernel's SMs": (
        "python/symcomm/gemm.py", "sms = max(1, runtime.sm_count() - (blocks if world > 1 else 0))",
        "sms = runtime.sm_count()", "test_gemm_plan.py -k share"),
    "every rank adds the bias": (
        "python/symcomm/gemm.py", "bias_ptr=bias_ptr if rank == 0 else 0", "bias_ptr=bias_ptr",
        "test_gemm_plan.py -k gemm_all_reduce"),
    "all-gather + GEMM writes rank l's rows one piece apart": (
        "python/symcomm/gemm.py", "d_batch=m * n", "d_batch=rows * n", "test_gemm_plan.py -k all_gather_gemm"),
    "two-shot result area on top of the staging area": (
        "python/symcomm/collectives.py", "result_offset = ctx.data - ctx.workspace + capacity",
        "result_offset = ctx.data - ctx.workspace", "test_collectives_plan.py -k all_reduce"),
    "reduce-scatter chunks sized for a single row": (
        "python/symcomm/collectives.py", "_chunks(c, isz, ctx.data_bytes // ctx.world)", "_chunks(c, isz, ctx.data_bytes)",
        "test_collectives_plan.py -k reduce_scatter"),
    "a staged chunk copied from the start of the row": (
        "python/symcomm/collectives.py", "staged.copy_(rows[:, lo:hi])", "staged.copy_(rows[:, :hi - lo])",
        "test_collectives_plan.py -k all_gather"),
    "all-gather rows placed one chunk apart": (
        "python/symcomm/collectives.py", "n * isz, x.dtype, _vec16(n * isz))", "(hi - lo) * isz, x.dtype, _vec16(n * isz))",
        "test_collectives_plan.py -k all_gather"),
    "16-byte vectors claimed for any pitch": (
        "python/symcomm/collectives.py", "return all(n % 16 == 0 for n in pitches)", "return True",
        "test_collectives_plan.py"),
    "a misaligned symmetric input read in place": (
        "python/symcomm/collectives.py", "if runtime.is_symmetric(rows) and rows.data_ptr() % 16 == 0:",
        "if runtime.is_symmetric(rows):", "test_collectives_plan.py"),
    "MoE dispatch passes the counts for the positions": (
        "python/symcomm/moe.py", "positions.data_ptr(), counts.data_ptr(), expert_x.data_ptr()",
        "counts.data_ptr(), positions.data_ptr(), expert_x.data_ptr()", "test_moe_plan.py"),
    "MoE grid sized from this rank's tokens": (
        "python/symcomm/moe.py", "_grid_bytes(capacity, hidden * x.element_size(), top_k)",
        "tokens * top_k * hidden * x.element_size()", "test_moe_plan.py"),
    "MoE combine told only the local experts": (
        "python/symcomm/moe.py", "local * runtime.world_size(), capacity, hidden", "local, capacity, hidden",
        "test_moe_plan.py"),
    "MoE ids flattened as a view": (
        "python/symcomm/moe.py", "ids = topk_ids.long().contiguous().view(-1)", "ids = topk_ids.reshape(-1).long()",
        "test_moe_plan.py"),
    "o_proj takes q_proj's bias flag": (
        "python/symcomm/nn/attention.py", "RowParallelLinear(num_heads * self.head_dim, hidden_size, o_proj_bias,",
        "RowParallelLinear(num_heads * self.head_dim, hidden_size, qkv_bias,", "test_nn.py -k attention"),
    "a weight shard that is a view of the full weight": (
        "python/symcomm/nn/sharding.py", "return t.narrow(dim, rank * size, size).clone()",
        "return t.narrow(dim, rank * size, size)", "test_model.py -k copies"),
    "the collective plot draws the baseline as busbw x speedup": (
        "python/symcomm/bench/harness.py", "sizes = dict((r.bytes, r.baseline_busbw_gbs) for r in rows)",
        "sizes = dict((r.bytes, r.busbw_gbs * r.speedup) for r in rows)", "test_bench.py"),
    "the MoE plot draws our latency as the baseline's": (
        "python/symcomm/bench/moe.py", '[getattr(r, f"base_{op}_us") for r in mine]',
        '[getattr(r, f"{op}_us") for r in mine]', "test_bench_moe.py"),
    # The whole path on the emulated device: torch.ops -> host side -> bindings -> kernels.
    "a one-shot all-reduce that leaves out the last PE": (
        "csrc/collectives/collectives.cu", "sum_range<T, N>(src, a.npes, reinterpret_cast<T*>(a.dst), lo, hi);",
        "sum_range<T, N>(src, a.npes - 1, reinterpret_cast<T*>(a.dst), lo, hi);",
        "test_collectives_gpu.py -k algorithms", "emulated"),
    "moe_dispatch's binding swaps positions and counts": (
        "csrc/bindings.cpp", "symcomm::moe_dispatch({workspace, x, topk_ids, positions, counts,",
        "symcomm::moe_dispatch({workspace, x, topk_ids, counts, positions,", "test_moe.py", "emulated"),
    "two-shot's result area on the staging area, on the emulated device": (
        "python/symcomm/collectives.py", "result_offset = ctx.data - ctx.workspace + capacity",
        "result_offset = ctx.data - ctx.workspace", "test_collectives_gpu.py -k two_shot", "emulated"),
    "the fused path without the join, on the emulated device": (
        "python/symcomm/gemm.py", "    main.wait_stream(side)\n", "", "test_gemm_gpu.py -k gemm_all_reduce", "emulated"),
    # The remote path's MoE kernels and the hierarchical collectives.
    "a push reduce of more than 8 rows keeps only its last pass": (
        "csrc/collectives/collectives.cu", "const int carried = done > 0,", "const int carried = 0,",
        "test_emu_collectives.py -k beyond"),
    "a barrier that waits for no more members than a block has threads": (
        "csrc/core/workspace.cuh", "member < team.size; member += blockDim.x", "member < team.size; member += 1 << 30",
        "test_emu_collectives.py -k beyond"),
    "the MoE remote path puts every row to PE 0": (
        "csrc/moe/moe.cu", "a.ws.base + a.mine.offset + row * a.row_bytes, src, a.row_bytes, owner);",
        "a.ws.base + a.mine.offset + row * a.row_bytes, src, a.row_bytes, 0);", "test_emu_moe.py -k rma"),
    "the MoE remote path tells its counts to PE 0 only": (
        "csrc/moe/moe.cu", "if (q != me) nvshmemx_putmem_block", "if (q == 0 && q != me) nvshmemx_putmem_block",
        "test_emu_moe.py -k rma"),
    "the MoE remote combine sums its token's first row k times": (
        "csrc/moe/moe.cu", "a.rma ? fetched + p * a.row_bytes", "a.rma ? fetched + t * a.top_k * a.row_bytes",
        "test_emu_moe.py -k rma"),
    "the MoE remote path puts from a private x": (
        "python/symcomm/moe.py", "if rma and layout is None and not runtime.is_symmetric(x):", "if False:", "test_moe.py",
        "emulated rma"),
    "the MoE remote path's combine does not check the data area's size": (
        "python/symcomm/moe.py", "        _data_area(\"moe_combine\"", "        0 and _data_area(\"moe_combine\"",
        "test_moe_gpu.py", "emulated rma"),
    "the hierarchical MoE puts a record before its warp has written it": (
        "csrc/moe/moe.cu", "    __syncwarp();\n    __threadfence();\n    for (int n = 0; n < nodes; ++n) {",
        "    for (int n = 0; n < nodes; ++n) {", "test_emu_moe.py -k hierarchical"),
    "the hierarchical MoE fans out before every record is in": (
        "csrc/moe/moe.cu", "  s.quiet();\n  s.team = h.rail();\n  s.close();\n}\n\n// Hierarchical dispatch, step 2",
        "  s.quiet();\n  s.save();\n}\n\n// Hierarchical dispatch, step 2", "test_emu_moe.py -k hierarchical"),
    "the hierarchical MoE adds the partial sums it computed for its rail peer": (
        "csrc/moe/moe.cu", "h.partial(2 * n + 1, pos) + v * N", "h.partial(2 * n, pos) + v * N",
        "test_emu_moe.py -k hierarchical"),
    "the hierarchical MoE weights every row of a node with the token's first weight": (
        "csrc/moe/moe.cu", "w[j] = load_cg(reinterpret_cast<const float*>(record + 8 * a.top_k) + j);",
        "w[j] = load_cg(reinterpret_cast<const float*>(record + 8 * a.top_k));", "test_emu_moe.py -k hierarchical"),
    "the hierarchical MoE numbers a node's tokens from 1": (
        "python/symcomm/moe.py", "touched.cumsum(0) - 1", "touched.cumsum(0)", "test_moe_gpu.py", "emulated 2 nodes"),
    "the MoE benchmark's token bound takes dispatch's records for combine's too": (
        "python/symcomm/moe.py", "for combine in (False, True))", "for combine in (False,))",
        "test_moe_gpu.py -k data_area", "emulated 2 nodes"),
    "the hierarchical all-gather leaves the blocks in node order": (
        "python/symcomm/collectives.py",
        "out.view(nodes, per_node, n).copy_(gathered.view(per_node, nodes, n).transpose(0, 1))",
        "out.view(per_node, nodes, n).copy_(gathered.view(per_node, nodes, n))", "test_collectives_gpu.py -k gather",
        "emulated 2 nodes"),
    "the hierarchical reduce-scatter and all-to-all send a place's rows to the wrong ranks": (
        "python/symcomm/collectives.py", "by_place = rows.view(nodes, per_node, c).transpose(0, 1)",
        "by_place = rows.view(nodes, per_node, c)", "test_collectives_gpu.py -k reduce_scatter", "emulated 2 nodes"),
    "debug mode leaves out where the remote path's expert buffers are": (
        "python/symcomm/moe.py", 'if runtime.backend() != "nvshmem" or runtime.transport() != "rma":', "if True:",
        "test_moe_gpu.py -k debug_mode", "emulated rma"),
    "the router's gradient pairs each token's expert rows in reverse order": (
        "python/symcomm/nn/moe.py", "grad_w = (fetched.view(*routing.shape, g.shape[1]) * g.unsqueeze(1)).sum(-1)",
        "grad_w = (fetched.view(*routing.shape, g.shape[1]).flip(1) * g.unsqueeze(1)).sum(-1)",
        "test_moe.py -k layer_matches_dense"),
    "the PE limit back at 64": (
        "csrc/core/limits.h", "constexpr int kMaxPes = 128;", "constexpr int kMaxPes = 64;",
        "test_emu_collectives.py -k pe_limit"),
    "MoE counts sized for the PEs a load/store kernel reads, not for every PE": (
        "csrc/core/workspace.cuh", "kMoeCountsBytes = sizeof(int) * kMaxPes * kMaxExperts",
        "kMoeCountsBytes = sizeof(int) * kMaxPeers * kMaxExperts", "test_emu_moe.py -k pe_limit"),
    # The machine code: the orderings as compiled, and the fused GEMM's core.
    "an acquire that is a relaxed load": (
        "csrc/core/memory.cuh", "ld.acquire.sys.global.u64", "ld.relaxed.sys.global.u64",
        "csrc/collectives/collectives.cu", "nvcc"),
    "a release that is a relaxed store": (
        "csrc/core/memory.cuh", "st.release.sys.global.u64", "st.relaxed.sys.global.u64",
        "csrc/collectives/collectives.cu", "nvcc"),
    "a wait that polls with a plain load": (
        "csrc/core/wait.cuh", "while ((seen = load_acquire_sys(flag)) < target)", "while ((seen = *flag) < target)",
        "csrc/collectives/collectives.cu", "nvcc"),
    "the GEMM core's TMA loads a band without the proxy fence": (
        "csrc/gemm/wgmma/gemm_core.cuh", '      asm volatile("fence.proxy.async.global;" ::: "memory");\n', "",
        "csrc/gemm/wgmma/bf16.cu", "nvcc"),
    "the GEMM core's band wait prints on timeout (a call: ptxas serializes the wgmma)": (
        "csrc/gemm/wgmma/gemm_core.cuh", "if (global_timer_ns() - start > params.timeout_ns) __trap();",
        'if (global_timer_ns() - start > params.timeout_ns) { printf("band %p\\n", band); __trap(); }',
        "csrc/gemm/wgmma/bf16.cu", "nvcc"),
    "the fused GEMM's comm kernel takes blocks beyond its PE's SMs": (
        "python/symcomm/gemm.py", "round(runtime.sm_count() * share)", "runtime.load_extension().max_blocks",
        "test_device_code.py -k resident", "device_code"),
}

# CMakeLists.txt's device compilation: pyproject's Release build type (CMake's CUDA Release flags), then
# the target's options; the GEMM core (csrc/gemm/wgmma/) whole-program, everything else relocatable.
CMAKE_RELEASE = ["-O3", "-DNDEBUG"]


def _cmake_flags(unit: str) -> list[str]:
    """nvcc's flags for a translation unit of csrc/, as CMakeLists.txt sets them."""
    cmake = (ROOT / "CMakeLists.txt").read_text()
    options = re.search(r"set\(cuda_options ([^)]*)\)", cmake)[1].split()
    core = unit.startswith("csrc/gemm/wgmma/")
    archs = re.search(r"^\s+CUDA_ARCHITECTURES (\S+)$" if core else r"set\(CMAKE_CUDA_ARCHITECTURES ([^)]*)\)", cmake,
                      re.M)[1]
    codes = []
    for arch in archs.split():
        name, kind = arch.split("-")
        codes.append(f"--generate-code=arch=compute_{name},code=[{'compute' if kind == 'virtual' else 'sm'}_{name}]")
    if core:
        spec = importlib.util.find_spec("cutlass_library")
        if spec is None:
            raise SystemExit("the GEMM core's mutations need CUTLASS's headers: pip install --no-deps "
                             "nvidia-cutlass==4.2.0.0 (the build's pin in pyproject.toml)")
        return [*CMAKE_RELEASE, *codes, *options, f"-I{list(spec.submodule_search_locations)[0]}/source/include"]
    nvshmem = list(importlib.util.find_spec("nvidia.nvshmem").submodule_search_locations)[0]
    return [*CMAKE_RELEASE, *codes, "-rdc=true", *options, f"-I{nvshmem}/include"]


def _compiled(csrc: Path, unit: str, out: Path) -> Path:
    """The object nvcc makes of csrc/<unit> (the unit's path below csrc/'s parent)."""
    obj = out / (unit.replace("/", "_") + ".o")
    cmd = ["nvcc", *_cmake_flags(unit), f"-I{csrc}", "-x", "cu", "-c", str(csrc.parent / unit), "-o", str(obj)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"nvcc failed on {unit}:\n{done.stderr[-3000:]}")
    return obj


def _machine_code_problems(csrc: Path, units: list[str], out: Path) -> list[str]:
    problems = []
    for unit in units:
        problems += device_code.ordering_problems(device_code.image(_compiled(csrc, unit, out)))
    return problems


@functools.cache
def _unmutated_passes(unit: str) -> None:
    with tempfile.TemporaryDirectory(prefix="symcomm-unmutated-") as tmp:
        problems = _machine_code_problems(ROOT / "csrc", [unit], Path(tmp))
    if problems:
        raise SystemExit(f"the machine-code checks fail on the unmutated {unit}:\n" + "\n".join(problems))


def _installed_extension() -> Path | None:
    """The built symcomm._C of the installed package (the scratch copy of python/ has none)."""
    spec = importlib.util.find_spec("symcomm")
    for folder in spec.submodule_search_locations if spec else []:
        for so in Path(folder).glob("_C*.so"):
            return so
    return None


def _planted(name: str, scratch: Path) -> Path:
    """A scratch copy of the mutated file's top folder (csrc/ or python/), with the mutation in it."""
    path, old, new, *_ = MUTATIONS[name]
    top = path.split("/", 1)[0]
    copy = scratch / top
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(ROOT / top, copy, ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    target = scratch / path
    text = target.read_text()
    if text.count(old) != 1:
        raise SystemExit(f"mutation {name!r}: {old!r} occurs {text.count(old)} times in {path}, expected once")
    target.write_text(text.replace(old, new))
    return copy


def run_one(name: str, scratch: Path) -> tuple[bool, float, str]:
    """(caught, seconds, what pytest reported)."""
    path, _, _, tests, *variant = MUTATIONS[name]
    copy = _planted(name, scratch)
    files, *select = tests.split(" ", 1)
    args = ["-x", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / files), *(select[0].split(" ", 1) if select else [])]
    env, python = dict(os.environ), sys.executable
    torchrun = [python, "-m", "torch.distributed.run", "--nproc-per-node=2", "-m", "pytest", "-m", "dist", *args]
    if path.startswith("python/"):
        extension = _installed_extension()
        if extension is not None:
            shutil.copy(extension, copy / "symcomm")
        env["PYTHONPATH"] = str(copy)
    if variant == ["nvcc"]:
        start = time.monotonic()
        for unit in tests.split():
            _unmutated_passes(unit)
        with tempfile.TemporaryDirectory(dir=scratch) as out:
            problems = _machine_code_problems(copy, tests.split(), Path(out))
        return bool(problems), time.monotonic() - start, (problems or ["no problem found"])[0][:300]
    if variant and variant[0].startswith("emulated"):
        module = emu_harness.builder(copy if path.startswith("csrc/") else ROOT / "csrc").build("plain")
        env.update(SYMCOMM_EMU_MODULE=str(module), SYMCOMM_TEST_BACKEND="nvshmem",
                   SYMCOMM_WORKSPACE_BYTES=str(EMULATED_WORKSPACE_BYTES), CUDA_VISIBLE_DEVICES="", SYMCOMM_TIMEOUT_S="20")
        _, world, _, run_env = next(r for r in EMULATED_RUNS if r[0] == variant[0].removeprefix("emulated"))
        env.update(run_env)
        cmd = [*torchrun[:3], f"--nproc-per-node={world}", *torchrun[4:]]
    elif path.startswith("csrc/"):
        env["SYMCOMM_EMU_CSRC"] = str(copy)
        if variant == ["tsan"]:
            python = str(emu_harness.builder(copy).tsan_python())
            env.update(SYMCOMM_EMU_VARIANT="tsan", OPENBLAS_NUM_THREADS="1", TSAN_OPTIONS="halt_on_error=1 exitcode=66")
        cmd = [python, "-m", "pytest", "--noconftest", *args]
    elif variant == ["device_code"]:
        cmd = [python, "-m", "pytest", *args]
    else:
        env.update(SYMCOMM_TEST_BACKEND="torch", CUDA_VISIBLE_DEVICES="")
        cmd = torchrun
    start = time.monotonic()
    done = subprocess.run(cmd, cwd=ROOT / "tests", env=env, capture_output=True, text=True, timeout=1200)
    out = done.stdout + done.stderr
    if "emulated build failed" in out:
        raise SystemExit(f"mutation {name!r} does not compile:\n{done.stdout[-3000:]}")
    # What failed: the first assertion pytest shows, else its summary line.
    shown = [l[1:].strip() for l in out.splitlines() if l.startswith("E ")]
    summary = [l.strip() for l in out.splitlines() if " passed" in l or " failed" in l]
    return done.returncode != 0, time.monotonic() - start, (shown or summary or [out[-200:]])[0][:300]


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
