"""The device code of symcomm._C as built: what each kernel costs an SM, whether the blocks that wait for
each other can all be resident, and whether the memory orderings survived compilation.

Reads any ELF that holds device code (the extension, an object file, a cubin) with cuobjdump and nvdisasm
from their PyPI wheels (nvidia-cuda-cuobjdump, nvidia-cuda-nvdisasm), never from PATH. Used by
tests/test_device_code.py (marker `device_code`), by tests/mutations.py (its "nvcc" mutations) and as a
command:

    python3 tests/device_code.py --write       # docs/kernel-resources.md from the installed symcomm._C
    python3 tests/device_code.py --check FILE  # the ordering and GEMM-core checks on any ELF or cubin

What the SASS of sm_90a looks like (learnt from small samples compiled with nvcc -cubin; the orderings
compile the same on sm_100a):
- ld.acquire.sys is LDG.E.64.STRONG.SYS then CCTL.IVALL; ld.relaxed.sys and volatile loads drop the CCTL.
- st.release.sys is MEMBAR.ALL.SYS then STG.E.64.STRONG.SYS; st.relaxed.sys is the store alone.
- fence.proxy.async.global is FENCE.VIEW.ASYNC.G.
- wgmma that ptxas serializes (its warning C7510, e.g. for a call in the kernel): every HGMMA carries gsb0
  and is waited for alone (WARPGROUP.DEPBAR.LE gsb0, 0x0); pipelined, only the last of a group does.
- setmaxnreg is USETMAXREG (.DEALLOC for the producer, .TRY_ALLOC for the consumers).
- spilled registers are stores and loads nvdisasm marks SpillRefill (the bytes ptxas -v reports as spills).
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import math
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "docs" / "kernel-resources.md"


# ---- tools ----

def tool(name: str) -> Path:
    """The binary `name` (cuobjdump, nvdisasm) of its wheel nvidia-cuda-<name>."""
    wheel = f"nvidia-cuda-{name}"
    try:
        files = importlib.metadata.files(wheel) or []
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"{name} comes from the {wheel} wheel: pip install '.[test]'") from None
    for f in files:
        if f.name == name and f.parent.name == "bin":
            return Path(f.locate())
    raise FileNotFoundError(f"the {wheel} wheel holds no bin/{name}")


def run_tool(name: str, *args: str, cwd: Path | None = None) -> str:
    done = subprocess.run([str(tool(name)), *args], capture_output=True, text=True, cwd=cwd)
    if done.returncode != 0:
        raise RuntimeError(f"{name} {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def installed_extension() -> Path:
    """The symcomm._C that pip installed (the build folder's copy carries build-time RUNPATHs)."""
    from symcomm import runtime

    ext = runtime.load_extension()
    if ext.__name__ != "symcomm._C":
        raise RuntimeError(f"the device code is symcomm._C's, but load_extension() gave {ext.__name__} "
                           f"(unset {runtime.EMU_MODULE_ENV})")
    return Path(ext.__file__)


# ---- reading an ELF ----

@dataclass
class Instr:
    offset: int
    pred: str      # "@P0", "@!UP1" or ""
    op: str        # "LDG.E.64.STRONG.SYS"
    args: list[str]
    source: tuple[str, int] | None  # innermost (file, line) of the line info, if any
    spill: bool    # a store or reload of a spilled register

    def __str__(self) -> str:
        return f"{self.offset:#06x} {self.pred + ' ' if self.pred else ''}{self.op} {', '.join(self.args)}"


@dataclass
class Function:
    symbol: str
    entry: bool  # a kernel
    code: list[Instr] = field(default_factory=list)
    labels: dict[str, int] = field(default_factory=dict)  # label -> index of the instruction it names

    def target(self, i: int) -> int | None:
        """The index a branch at i jumps to."""
        m = re.search(r"`\((\.L_x_\d+)\)", " ".join(self.code[i].args))
        return self.labels.get(m[1]) if m else None


@dataclass
class Kernel:
    arch: str
    symbol: str
    name: str
    threads: int | None  # the launch bound (max threads per block), None without one
    registers: int
    stack: int
    shared: int          # static, as the cubin records it
    local_ops: int       # local-memory loads and stores (stack frame: printf arguments, local arrays, spills)
    spill_ops: int
    dynamic_shared: int = 0


# offset, predicate, opcode, operands, the compiler's annotation (SpillRefill), ";"
_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(?:(@!?U?P\w+)\s+)?([A-Z][\w.]*)\s*(.*?)\s*(\(\*.*\*\))?\s*;")
_SOURCE = re.compile(r'^\s*//## File "([^"]+)", line (\d+)')


def split_args(text: str) -> list[str]:
    """SASS operands split at the commas outside brackets."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch in "[(") - (ch in "])")
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return out + [cur.strip()] if cur.strip() else out


def parse_sass(text: str) -> tuple[str, dict[str, Function]]:
    """(arch, {symbol: function}) from `nvdisasm -c -g`."""
    arch, functions, fn, source = "", {}, None, None
    for line in text.splitlines():
        if m := re.match(r"\s*\.target\s+(\w+)", line):
            arch = m[1]
        elif m := re.match(r"\s*\.type\s+(\S+?),@function", line):
            fn = functions.setdefault(m[1], Function(m[1], entry=False))
            source = None
        elif m := re.match(r'\s*\.other\s+(\S+?),@"([^"]*)"', line):
            functions.setdefault(m[1], Function(m[1], entry=False)).entry = "STO_CUDA_ENTRY" in m[2]
        elif fn is None:
            continue
        elif m := _SOURCE.match(line):
            source = (m[1], int(m[2]))
        elif m := re.match(r"^(\.L_x_\d+):", line):
            fn.labels[m[1]] = len(fn.code)
        elif m := _INSTR.match(line):
            fn.code.append(Instr(int(m[1], 16), m[2] or "", m[3], split_args(m[4]), source,
                                 "SpillRefill" in (m[5] or "")))
    return arch, functions


def _resource_usage(text: str) -> dict[str, dict[str, int]]:
    """{symbol: {REG, STACK, SHARED, LOCAL, ...}} from `cuobjdump -res-usage`."""
    usage, symbol = {}, None
    for line in text.splitlines():
        if m := re.match(r"\s*Function (\S+):$", line):
            symbol = m[1]
        elif symbol and line.strip().startswith("REG:"):
            usage[symbol] = {k: int(v) for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line)}
            symbol = None
    return usage


def _launch_bounds(text: str) -> dict[str, int]:
    """{symbol: max threads per block} from the EIATTR_MAX_THREADS of `cuobjdump -elf`."""
    bounds, symbol, attribute = {}, None, None
    for line in text.splitlines():
        if line.startswith(".nv.info."):
            symbol = line[len(".nv.info."):].strip()
        elif m := re.match(r"\s*Attribute:\s*(\w+)", line):
            attribute = m[1]
        elif symbol and attribute == "EIATTR_MAX_THREADS" and (m := re.match(r"\s*Value:\s*(.*)", line)):
            bounds[symbol] = math.prod(int(v, 16) for v in m[1].split())
            attribute = None
    return bounds


_RDC_PREFIX = re.compile(r"^__nv_static_\w*?_(?=_Z)")  # a relocatable unit's file-local symbols
_GMMA = re.compile(r"(MMA_\d+x\d+x\d+_\w+?_[RS]S)I\w*?MajorE(\d)E\w*?_(\d)E")
_MAJOR = {"0": "K", "1": "MN"}


def short_names(symbols: list[str]) -> dict[str, str]:
    """Readable kernel names: reduce_kernel<float, 4>; CUTLASS's GEMM by its MMA atom and B's layout
    (c++filt gives up on that name)."""
    if shutil.which("c++filt") is None:
        raise FileNotFoundError("c++filt (binutils) names the kernels: apt-get install binutils")
    plain = [_RDC_PREFIX.sub("", s) for s in symbols]
    demangled = subprocess.run(["c++filt"], input="\n".join(plain), capture_output=True, text=True,
                               check=True).stdout.splitlines()
    names = {}
    for symbol, name in zip(symbols, demangled):
        if (m := _GMMA.search(symbol)) and "GemmUniversal" in symbol:
            names[symbol] = f"GemmUniversal<{m[1]}, B {_MAJOR[m[3]]}-major>"
            continue
        name = name.replace("(anonymous namespace)::", "")
        name = re.sub(r"\b\w+::", "", name).removeprefix("void ")
        names[symbol] = name.split("(", 1)[0]
    return names


@dataclass
class Image:
    """Every cubin of one ELF file: per arch, its functions and its kernels' resources."""

    path: Path
    functions: dict[str, dict[str, Function]]  # arch -> symbol -> function
    kernels: list[Kernel]

    def all_functions(self):
        for arch, functions in self.functions.items():
            for fn in functions.values():
                yield arch, fn


def _is_cubin(path: Path) -> bool:
    head = path.read_bytes()[:20]
    return head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 190  # EM_CUDA


@functools.cache
def image(path: Path) -> Image:
    """Disassembles every cubin in `path` (cached: once per file)."""
    functions: dict[str, dict[str, Function]] = {}
    kernels = []
    with tempfile.TemporaryDirectory(prefix="symcomm-cubins-") as tmp:
        if _is_cubin(path):
            cubins = [path]
        else:
            run_tool("cuobjdump", "-xelf", "all", str(path.resolve()), cwd=Path(tmp))
            cubins = sorted(Path(tmp).glob("*.cubin"))
        if not cubins:
            raise ValueError(f"{path} holds no device code")
        for cubin in cubins:
            arch, fns = parse_sass(run_tool("nvdisasm", "-c", "-g", str(cubin)))
            functions.setdefault(arch, {}).update(fns)
            usage = _resource_usage(run_tool("cuobjdump", "-res-usage", str(cubin)))
            bounds = _launch_bounds(run_tool("cuobjdump", "-elf", str(cubin)))
            entries = [fn for fn in fns.values() if fn.entry]
            names = short_names([fn.symbol for fn in entries])
            for fn in entries:
                u = usage[fn.symbol]
                kernels.append(Kernel(
                    arch, fn.symbol, names[fn.symbol], bounds.get(fn.symbol), u["REG"], u["STACK"], u["SHARED"],
                    sum(i.op.startswith(("LDL", "STL")) for i in fn.code), sum(i.spill for i in fn.code)))
    return Image(path, functions, sorted(kernels, key=lambda k: (k.arch, k.name)))


# ---- what an SM holds ----

@dataclass(frozen=True)
class SmLimits:
    """Per SM: 64K 32-bit registers allocated per warp in units of 256, 2048 threads, 32 blocks, 228 KB
    of shared memory, at most 227 KB for one block and 1 KB reserved by the system for each block."""

    registers: int = 65536
    register_unit: int = 256
    threads: int = 2048
    blocks: int = 32
    shared: int = 228 * 1024
    shared_per_block: int = 227 * 1024
    reserved_per_block: int = 1024


HOPPER = SmLimits()
SM_LIMITS = {"sm_90": HOPPER, "sm_90a": HOPPER}
H100_SMS = 132  # H100 SXM and H200
MOST_THREADS = 1024  # what a launch may ask for where the kernel sets no bound


def blocks_per_sm(k: Kernel) -> tuple[int, str] | None:
    """(how many blocks of `k` an SM holds at once, what limits it), None for an arch without limits here.

    Static shared memory is the cubin's, which on sm_90 already counts a 1 KB reserved area
    (.nv.reservedSmem) in every kernel that uses shared memory; the system's 1 KB per block is added
    on top, so it may be counted twice: a bound from below, which is what co-residency needs."""
    limits = SM_LIMITS.get(k.arch)
    if limits is None:
        return None
    warps = -(-(k.threads or MOST_THREADS) // 32)
    per_warp = -(-k.registers * 32 // limits.register_unit) * limits.register_unit
    if k.shared + k.dynamic_shared > limits.shared_per_block:
        return 0, "shared memory"
    shared = k.shared + k.dynamic_shared + limits.reserved_per_block
    by = {"blocks": limits.blocks, "threads": limits.threads // (warps * 32),
          "registers": limits.registers // (per_warp * warps), "shared memory": limits.shared // shared}
    limit = min(by, key=lambda what: by[what])
    return by[limit], limit


def with_dynamic_shared(kernels: list[Kernel], ext) -> list[Kernel]:
    """The kernels with the dynamic shared memory the host launches them with: the GEMM core's
    (symcomm._C says how much); every other kernel of symcomm launches with none (core/launch.cuh)."""
    for k in kernels:
        if (m := _GMMA.search(k.symbol)) and "GemmUniversal" in k.symbol:
            dtype = 2 if "BF16" in m[1] else 1
            k.dynamic_shared = ext.gemm_core_shared_bytes(dtype, m[3] == "0")
    return kernels


def resource_table(img: Image) -> str:
    """docs/kernel-resources.md."""
    lines = [
        "# Kernel resources of symcomm._C",
        "",
        "Generated from the installed extension by `python3 tests/device_code.py --write` (cuobjdump and",
        "nvdisasm from their wheels); `python3 -m pytest tests -m device_code` fails while this file differs",
        "from what the build produced, so a change to the kernels comes with this table regenerated.",
        "",
        "- threads: the kernel's launch bound (max threads per block); `-` where it sets none (then the",
        "  blocks per SM assume the most a launch may ask, 1024).",
        "- stack: bytes per thread (printf's arguments, local arrays, NVSHMEM's calls); local ld/st: the",
        "  local-memory instructions in its SASS; spill: those that move spilled registers (must be 0).",
        "- shared: static (as the cubin records it: on sm_90 it includes a 1 KB reserved area wherever a",
        "  kernel uses shared memory) and dynamic (what the host launches with).",
        "- blocks/SM on an H100/H200 SM, and what limits it: 65536 registers allocated per warp in units of",
        "  256, 2048 threads, 32 blocks, 228 KB shared memory (227 KB for one block) plus 1 KB per block.",
        "",
    ]
    for arch in sorted({k.arch for k in img.kernels}):
        lines += [f"## {arch}", "", "| kernel | threads | registers | stack | local ld/st | spill | shared | "
                  "dynamic shared | blocks/SM |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for k in (k for k in img.kernels if k.arch == arch):
            fits = blocks_per_sm(k)
            occupancy = "no limits recorded for this arch" if fits is None else f"{fits[0]} ({fits[1]})"
            lines.append(f"| `{k.name}` | {k.threads or '-'} | {k.registers} | {k.stack} | {k.local_ops} | "
                         f"{k.spill_ops} | {k.shared} | {k.dynamic_shared} | {occupancy} |")
        lines.append("")
    return "\n".join(lines)


# ---- co-residency ----

def role(k: Kernel) -> str | None:
    """"peers": block b waits for block b of the other PEs (every kernel of the collectives and MoE, the
    sanity checks but peer_load); "fused": the fused GEMM's core or its comm kernel, which wait for each
    other's tiles or bands; "none": it waits for nobody; None: not classified here (a new kernel must be)."""
    if "GemmUniversal" in k.symbol or k.name.startswith("gemm_comm_kernel"):
        return "fused"
    if re.search(r"_(collectives|moe)_cu_", k.symbol):
        return "peers"
    if "_sanity_cu_" in k.symbol:
        return "none" if k.name.startswith("peer_load_kernel") else "peers"
    if k.name.startswith("gemm_begin_kernel"):
        return "none"
    return None


def mps_scenarios(most_pes: int = 8):
    """(PEs on the GPU, CUDA_MPS_ACTIVE_THREAD_PERCENTAGE of each): even splits of 100 and a lopsided one."""
    for pes in range(1, most_pes + 1):
        even = [100 // pes + (i < 100 % pes) for i in range(pes)]
        yield pes, even
        if pes > 1:
            yield pes, [100 - 10 * (pes - 1)] + [10] * (pes - 1)


def co_residency_problems(kernels: list[Kernel], sms: int, pes: int, percents: list[int], ext) -> list[str]:
    """Why blocks that wait for each other could not all be resident on a GPU of `sms` SMs shared by
    `pes` PEs under MPS at `percents`, with the grids the host gives them; [] if they can. The host's
    choices: runtime._sm_share (a PE's SMs), the cap it sets on every collective and MoE grid
    (runtime.blocks_cap; core/launch.cuh's grid_for never exceeds it), and the fused GEMM's split
    (gemm._comm_blocks for the comm kernel, gemm._gemm_sms for the persistent GEMM).

    Sufficient conditions, per PE (whose SMs MPS is assumed to report as the GPU's times its percentage,
    rounded down: not checked on a GPU):
    - the PEs' shares fit in the GPU together;
    - a kernel alone: its grid fits in the PE's share at its blocks per SM;
    - the fused GEMM's core and its comm kernel side by side (one job of two or more ranks): one block per
      SM each, so a block always finds an SM that holds nothing while they take no more SMs than the share.
    """
    from symcomm import gemm, runtime

    problems, shares = [], []
    sized = [(k, blocks_per_sm(k)) for k in kernels]
    for k, fits in sized:
        if fits is not None and role(k) is None:
            problems.append(f"{k.name} ({k.arch}): not classified: say in device_code.role whether its blocks "
                            f"wait for other blocks")
    for pe, percent in enumerate(percents):
        seen = sms * percent // 100
        # A server at its default (100) and each client's variable set, as tests/run.py runs PEs under MPS.
        share, why = runtime._sm_share(seen, pes, {runtime.MPS_PERCENTAGE: str(percent)}, "100")
        shares.append(share)
        where = f"PE {pe} of {pes} at {runtime.MPS_PERCENTAGE}={percent} ({seen} SMs seen, {share} used: {why})"
        cap = runtime.blocks_cap(share, ext.max_blocks)
        for k, fits in sized:
            if fits is not None and role(k) == "peers" and cap > share * fits[0]:
                problems.append(f"{k.name} ({k.arch}): {cap} blocks at {fits[0]} per SM ({fits[1]}) need "
                                f"{-(-cap // max(fits[0], 1))} SMs; {where}")
        comm = _with_sm_count(runtime, share, gemm._comm_blocks)
        core = _with_sm_count(runtime, share, lambda: gemm._gemm_sms(world=2))  # a job of 2 or more ranks
        for k, fits in sized:
            if fits is not None and role(k) == "fused" and fits[0] < 1:
                problems.append(f"{k.name} ({k.arch}): not one block fits an SM ({fits[1]}); {where}")
        if comm + core > share:
            problems.append(f"fused GEMM: {core} GEMM blocks and {comm} comm blocks need {comm + core} SMs; {where}")
    if sum(shares) > sms:
        problems.append(f"{pes} PEs at {percents} use {shares} SMs, {sum(shares)} of the GPU's {sms}")
    return problems


def _with_sm_count(runtime, sms: int, fn):
    """fn() where runtime.sm_count() says `sms` (it reads the state init leaves)."""
    sm_count = runtime.sm_count
    runtime.sm_count = lambda: sms
    try:
        return fn()
    finally:
        runtime.sm_count = sm_count


# ---- the orderings, as compiled ----

def _primitive_lines(path: str, name: str) -> range | None:
    """The lines of the GPU definition of `name` (the one with inline asm) in the header at `path` (as
    the line info names it; this checkout's copy where that path is gone)."""
    file = Path(path)
    if not file.exists() and "/csrc/" in path:
        file = ROOT / "csrc" / path.split("/csrc/", 1)[1]
    if not file.exists():
        return None
    lines = file.read_text().splitlines()
    for start, line in enumerate(lines):
        if line.startswith("__device__") and re.search(rf"\b{name}\(", line):
            end = next(i for i in range(start, len(lines)) if lines[i].startswith("}"))
            if any("asm" in lines[i] for i in range(start, end + 1)):
                return range(start + 1, end + 2)
    return None


class Primitives:
    """Which instructions come from load_acquire_sys and store_release_sys (csrc/core/memory.cuh), by line info."""

    NAMES = ("load_acquire_sys", "store_release_sys")

    def __init__(self):
        self.ranges: dict[tuple[str, str], range | None] = {}

    def of(self, ins: Instr) -> str | None:
        if ins.source is None or not ins.source[0].endswith("core/memory.cuh"):
            return None
        for name in self.NAMES:
            key = (ins.source[0], name)
            if key not in self.ranges:
                self.ranges[key] = _primitive_lines(*key)
            if self.ranges[key] and ins.source[1] in self.ranges[key]:
                return name
        return None


def _is_global_load(op: str) -> bool:
    return op.startswith(("LDG.", "LD.")) or op in ("LDG", "LD")


def _is_global_store(op: str) -> bool:
    return op.startswith(("STG.", "ST.")) or op in ("STG", "ST")


def _acquire_problems(fn: Function, prim: Primitives, where: str) -> list[str]:
    problems = []
    for i, ins in enumerate(fn.code):
        if not (_is_global_load(ins.op) and prim.of(ins) == "load_acquire_sys"):
            continue
        after = [x for x in fn.code[i + 1:i + 4] if prim.of(x) == "load_acquire_sys"]
        if ".STRONG.SYS" not in ins.op or not any(x.op == "CCTL.IVALL" for x in after):
            problems.append(f"{where}: load_acquire_sys compiled to {ins} without CCTL.IVALL after it; an "
                            f"acquire at system scope is LDG.E.64.STRONG.SYS then CCTL.IVALL")
    return problems


def _release_problems(fn: Function, prim: Primitives, where: str) -> list[str]:
    problems = []
    for i, ins in enumerate(fn.code):
        if not (_is_global_store(ins.op) and prim.of(ins) == "store_release_sys"):
            continue
        before = [x for x in fn.code[max(0, i - 4):i] if prim.of(x) == "store_release_sys"]
        if ".STRONG.SYS" not in ins.op or not any(re.match(r"MEMBAR\.\w+\.SYS$", x.op) for x in before):
            problems.append(f"{where}: store_release_sys compiled to {ins} without MEMBAR.ALL.SYS before it; a "
                            f"release at system scope is MEMBAR.ALL.SYS then STG.E.64.STRONG.SYS")
    return problems


def _gemm_core_problems(fn: Function, prim: Primitives, where: str) -> list[str]:
    """The GEMM core's hooks and its register split, in a kernel with wgmma (HGMMA)."""
    code = fn.code
    problems = []
    acquires = [i for i, x in enumerate(code) if _is_global_load(x.op) and prim.of(x) == "load_acquire_sys"]
    releases = [i for i, x in enumerate(code) if _is_global_store(x.op) and prim.of(x) == "store_release_sys"]
    if not acquires:
        problems.append(f"{where}: no band wait (load_acquire_sys) in the GEMM core")
    if not releases:
        problems.append(f"{where}: no tile tag (store_release_sys) in the GEMM core")
    for a in acquires:
        tma = next((j for j in range(a, len(code)) if code[j].op.startswith("UTMALDG")), None)
        if tma is None or not any(x.op == "FENCE.VIEW.ASYNC.G" for x in code[a:tma]):
            problems.append(f"{where}: no FENCE.VIEW.ASYNC.G (fence.proxy.async.global) between the band wait at "
                            f"{code[a].offset:#06x} and the TMA load after it"
                            f"{f' at {code[tma].offset:#06x}' if tma is not None else ''}")
    for r in releases:
        data = [j for j in range(r) if _is_global_store(code[j].op) and ".STRONG" not in code[j].op]
        barrier = data and any(x.op.startswith("BAR.SYNC") for x in code[data[-1]:r])
        if not barrier:
            problems.append(f"{where}: the tile tag at {code[r].offset:#06x} does not follow the epilogue's stores "
                            f"and a barrier of the threads that made them")
    setmaxnreg = {x.op.split(".")[1] for x in code if x.op.startswith("USETMAXREG.")}
    if not {"DEALLOC", "TRY_ALLOC"} <= setmaxnreg:
        problems.append(f"{where}: setmaxnreg is gone (USETMAXREG {sorted(setmaxnreg)}; the register split "
                        f"needs .DEALLOC and .TRY_ALLOC)")
    hgmma = [x for x in code if x.op.startswith("HGMMA")]
    if hgmma and all("gsb0" in x.args for x in hgmma):
        problems.append(f"{where}: its {len(hgmma)} wgmma are serialized (every HGMMA waited for alone)")
    return problems


def _defines(ins: Instr, reg: str) -> bool:
    """Whether `ins` writes register `reg` (its leading operands; 64- and 128-bit results cover 2 and 4)."""
    if not ins.args:
        return False
    dests = [ins.args[0]] + [a for a in ins.args[1:3] if re.fullmatch(r"!?U?P(\d+|T)", a)][:1]
    width = 4 if ".128" in ins.op else 2 if ".64" in ins.op or ".WIDE" in ins.op else 1
    for d in dests:
        m = re.fullmatch(r"(U?R)(\d+)", d)
        if m and (mr := re.fullmatch(r"(U?R)(\d+)", reg)) and m[1] == mr[1]:
            if int(m[2]) <= int(mr[2]) < int(m[2]) + width:
                return True
        elif d == reg:
            return True
    return False


def _sources(ins: Instr) -> list[str]:
    return re.findall(r"\bU?[RP]\d+\b", " ".join(ins.args[1:]))


def _reaching(fn: Function, reg: str, pos: int, lo: int, hi: int) -> list[int]:
    """Instructions in fn.code[lo:hi+1] that may have written `reg` last before `pos`, going round the
    loop [lo, hi] once."""
    order = list(range(pos - 1, lo - 1, -1)) + list(range(hi, pos - 1, -1))
    found = []
    for j in order:
        if _defines(fn.code[j], reg):
            found.append(j)
            if not fn.code[j].pred:
                break
    return found


def _module_variable(fn: Function, load: int) -> bool:
    """Whether a load reads a __device__ variable (one the host sets: g_wait_timeout_ns) at the address the
    module gives it: a relocation of its symbol (relocatable code) or constant bank 4 (whole programs)."""
    address = re.findall(r"\bU?R\d+\b", " ".join(fn.code[load].args[1:]))
    seen, todo = set(), [(r, load) for r in address]
    while todo:
        reg, pos = todo.pop()
        for j in _reaching(fn, reg, pos, 0, pos - 1) if pos > 0 else []:
            if j in seen:
                continue
            seen.add(j)
            if re.search(r"32@(lo|hi)\(|c\[0x4\]", " ".join(fn.code[j].args)):
                return True
            todo += [(r, j) for r in _sources(fn.code[j])]
    return False


def _spin_loops(fn: Function):
    """(first, last) index of each loop that only reads: no inner loop, no store, atomic or call in it."""
    back = {i: fn.target(i) for i, x in enumerate(fn.code) if x.op.startswith("BRA")}
    for hi, lo in back.items():
        if lo is None or lo > hi or any(lo <= j < hi and (t or hi + 1) <= j for j, t in back.items()):
            continue
        body = fn.code[lo:hi + 1]
        if not any(_is_global_store(x.op) or x.op.startswith(("ATOM", "RED", "STS", "STL", "CALL")) for x in body):
            yield lo, hi


def _weak_polls(fn: Function, where: str) -> list[str]:
    """Spin loops whose exit depends on a weak (not .STRONG) load: a wait that may never see the flag change."""
    problems = []
    for lo, hi in _spin_loops(fn):
        ins = fn.code[hi]
        exits = [i for i in range(lo, hi + 1) if fn.code[i].op.startswith("BRA") and fn.code[i].pred
                 and (i == hi or not lo <= (fn.target(i) or lo) <= hi)]
        seen, todo = set(), [(fn.code[i].pred.lstrip("@!"), i) for i in exits]
        while todo:
            reg, pos = todo.pop()
            for j in _reaching(fn, reg, pos, lo, hi):
                if j in seen:
                    continue
                seen.add(j)
                x = fn.code[j]
                if _is_global_load(x.op):
                    # A poll reads one address over and over (a list walk loads its next address).
                    address = re.findall(r"\bU?R\d+\b", " ".join(x.args[1:]))
                    same = not any(_defines(y, r) for y in fn.code[lo:hi + 1] for r in address)
                    if same and ".STRONG." not in x.op and not _module_variable(fn, j):
                        problems.append(f"{where}: the loop at {fn.code[lo].offset:#06x}-{ins.offset:#06x} polls "
                                        f"with a weak load, {x}")
                else:
                    todo += [(r, j) for r in _sources(x)]
    return problems


def ordering_problems(img: Image) -> list[str]:
    """Every check of the compiled orderings and of the GEMM core, over every function of every arch."""
    prim = Primitives()
    problems, used = [], set()
    names = {k.symbol: k.name for k in img.kernels}
    for arch, fn in img.all_functions():
        where = f"{names.get(fn.symbol, fn.symbol)} ({arch})"
        used |= {prim.of(x) for x in fn.code} - {None}
        problems += _acquire_problems(fn, prim, where) + _release_problems(fn, prim, where)
        problems += _weak_polls(fn, where)
        if fn.entry and any(x.op.startswith("HGMMA") for x in fn.code):
            problems += _gemm_core_problems(fn, prim, where)
    for name in Primitives.NAMES:
        if name not in used:
            problems.append(f"{img.path}: no instruction comes from {name} (built without -lineinfo?)")
    return problems


def spill_problems(img: Image) -> list[str]:
    return [f"{k.name} ({k.arch}) spills: {k.spill_ops} local loads and stores of spilled registers"
            for k in img.kernels if k.spill_ops]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"write {TABLE.relative_to(ROOT)}")
    parser.add_argument("--check", metavar="ELF", type=Path,
                        help="run the ordering and GEMM-core checks on this file (an extension, object or cubin)")
    args = parser.parse_args()
    if args.check:
        problems = ordering_problems(image(args.check))
        print("\n".join(problems) or f"{args.check}: the orderings and the GEMM core are as they should be")
        return 1 if problems else 0
    from symcomm import runtime

    img = image(installed_extension())
    with_dynamic_shared(img.kernels, runtime.load_extension())
    table = resource_table(img)
    if args.write:
        TABLE.write_text(table)
        print(f"wrote {TABLE}")
    else:
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
