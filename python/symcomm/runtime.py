"""Process-wide state: init / finalize, the active backend, and symmetric-heap allocation.

Order matters on the nvshmem backend (see the README's "How it starts"):
torch.distributed -> nvshmem4py host init (unique id over torch.distributed) -> our extension's
device state -> workspace. finalize() walks the same steps backwards.

With SYMCOMM_EMU_MODULE set (the path that `python3 csrc/emu/build.py` prints), the nvshmem backend
runs on the emulated device instead (docs/emulation.md): the same kernels and bindings built for the
CPU, one PE per rank, each rank's symmetric heap a shared-memory segment that every rank maps, and
symmetric tensors CPU tensors on it. Only then, never by default.
"""

from __future__ import annotations

import ctypes
import datetime
import functools
import importlib
import logging
import math
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

log = logging.getLogger("symcomm")

BACKENDS = ("auto", "nvshmem", "torch")
DEFAULT_WORKSPACE_BYTES = 64 << 20
DEFAULT_TIMEOUT_S = 60.0
EMU_MODULE_ENV = "SYMCOMM_EMU_MODULE"
# The emulated device's heap beyond the workspace (SYMCOMM_EMU_HEAP_BYTES): pages are only used once touched.
DEFAULT_EMU_HEAP_BYTES = 1 << 30
EMULATED_SMS = 8  # blocks the emulated device runs at once per PE (each an OS thread)
TRANSPORT_ENV = "SYMCOMM_TRANSPORT"
TRANSPORTS = ("auto", "rma")
# A test switch: the ranks sit on nodes of this many, in rank order, in place of their hosts (0 or unset:
# the hosts say). On the emulated device load/store does not reach across these nodes; on a GPU it
# still does and only the layout changes, so that with SYMCOMM_TRANSPORT=rma one GPU runs the
# hierarchical kernels.
PES_PER_NODE_ENV = "SYMCOMM_PES_PER_NODE"
_ALIGN = 256  # of symmetric allocations on the emulated heap, as NVSHMEM's
# The fused GEMM's core (csrc/gemm/wgmma/) is sm_90a code only: wgmma and setmaxnreg exist nowhere else.
GEMM_CORE_CAPABILITY = (9, 0)


class NotInitializedError(RuntimeError):
    pass


@dataclass
class _State:
    backend: str
    rank: int
    world_size: int
    device: torch.device
    timeout_s: float
    owns_process_group: bool
    # Ranks that share one GPU: NCCL refuses them, so the process group is gloo only.
    shared_gpu: bool = False
    # The ranks of this node on this rank's GPU, this one included.
    pes_per_gpu: int = 1
    workspace: torch.Tensor | None = None
    # Every live allocation of empty(), keyed by storage address. Holding them here keeps their
    # frees collective and explicit (free() or finalize()), never in a garbage-collector callback.
    symmetric: dict[int, torch.Tensor] = field(default_factory=dict)
    nvshmem_up: bool = False
    init_args: tuple = ()
    # This rank's share of the GPU's SMs (all of them, or its MPS share), the same on every rank.
    sms: int = 0
    # The emulated device: this rank's heap and what of it is free, {offset: bytes}.
    heap: tuple[int, int] | None = None
    free_blocks: dict[int, int] = field(default_factory=dict)
    # The fused GEMM ops' second stream (symcomm.streams.side), made at first use.
    side_stream: object = None
    # nvshmem backend, learnt at init: whether load/store reaches every PE from every PE; (nodes, ranks
    # per node) where ranks sit on several nodes of several each, in rank order, else None; and how the
    # collectives reach their peers: "p2p" (load/store) or "rma" (NVSHMEM puts and signals).
    all_reachable: bool = True
    node_layout: tuple[int, int] | None = None
    node_reachable: bool = True
    transport: str = "p2p"
    # The GPU's compute capability (nvshmem backend on a GPU; None elsewhere).
    capability: tuple[int, int] | None = None


_state: _State | None = None


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
    if value <= 0:
        raise ValueError(f"{name}={raw!r} must be positive")
    return value


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None


@functools.cache  # asked on every launch; fixed for the process, as the extension load_extension picks
def emulated() -> bool:
    """Whether the nvshmem backend runs on the emulated device (SYMCOMM_EMU_MODULE is set)."""
    return bool(os.environ.get(EMU_MODULE_ENV))


@functools.cache
def load_extension():
    """Imports symcomm._C, loading NVSHMEM's host library from its wheel first (once: ops call this
    on every launch); or, on the emulated device, the emulated module SYMCOMM_EMU_MODULE names.

    The wheel ships only versioned .so files in a directory no loader searches, so the library is
    opened by full path (RTLD_GLOBAL) before the extension that needs it. If torch already loaded
    libnvshmem_host.so.3 (torch >= 2.11 CUDA wheels do), the loader reuses that copy.
    """
    if emulated():
        path = os.environ[EMU_MODULE_ENV]
        spec = importlib.util.spec_from_file_location("symcomm._emu", path)
        if spec is None or not os.path.isfile(path):
            raise ImportError(f"{EMU_MODULE_ENV}={path!r} is not a module file (python3 csrc/emu/build.py prints it)")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    spec = importlib.util.find_spec("nvidia.nvshmem")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("NVSHMEM host library not found: pip install 'nvidia-nvshmem-cu13>=3.4.5'")
    lib_dir = os.path.join(list(spec.submodule_search_locations)[0], "lib")
    ctypes.CDLL(os.path.join(lib_dir, "libnvshmem_host.so.3"), mode=ctypes.RTLD_GLOBAL)
    return importlib.import_module("symcomm._C")


def _nvshmem_unavailable_reason(device: torch.device) -> str | None:
    """Why the nvshmem backend cannot run in this process, or None if it can."""
    if emulated():
        try:
            ext = load_extension()
        except ImportError as e:
            return f"the emulated device could not be loaded ({e})"
        return None if dist.get_world_size() <= ext.max_pes else \
            f"{dist.get_world_size()} ranks; the nvshmem kernels support at most {ext.max_pes}"
    if device.type != "cuda":
        return "no CUDA GPU is visible to torch"
    try:
        ext = load_extension()
    except ImportError as e:
        return f"the CUDA extension symcomm._C could not be loaded ({e}); was symcomm built with SYMCOMM_CUDA=OFF?"
    except OSError as e:
        return f"the NVSHMEM host library could not be loaded ({e})"
    if dist.get_world_size() > ext.max_pes:
        return f"{dist.get_world_size()} ranks; the nvshmem kernels support at most {ext.max_pes}"
    if problem := _arch_problem(torch.cuda.get_device_capability(device), ext.cuda_archs):
        return problem
    try:
        import nvshmem.core  # noqa: F401
    except Exception as e:  # nvshmem4py raises assorted errors when cuda-python is off
        return f"nvshmem4py could not be imported ({type(e).__name__}: {e}); pip install nvshmem4py-cu13"
    return None


def _arch_problem(capability: tuple[int, int], archs: str) -> str | None:
    """Why the kernels of symcomm._C, built for `archs` (CMAKE_CUDA_ARCHITECTURES, comma-separated), cannot
    load on a GPU of this compute capability, or None if they can. Only machine code counts: the device
    link of relocatable code keeps no PTX for a newer GPU to compile. Machine code for sm_XY runs on X.Y
    and later minors of X; an arch-specific sm_XYa only on X.Y."""
    built = []
    for arch in archs.split(","):
        name, _, kind = arch.partition("-")
        if kind == "virtual":
            continue
        digits = name.rstrip("af")
        if not digits.isdigit():
            return None  # "native", "all": what they stand for is not recorded, so the load will tell
        major, minor = divmod(int(digits), 10)
        exact = name.endswith("a")
        if (major, minor) == capability or (not exact and major == capability[0] and minor <= capability[1]):
            return None
        built.append(f"sm_{name}")
    return (f"this GPU has compute capability {capability[0]}.{capability[1]}, and symcomm._C holds machine code "
            f"for {', '.join(built) or 'no GPU'} only")


def _rank_env() -> tuple[int, int, int, int]:
    """(rank, world_size, local_rank, local_world_size) from torchrun's variables, or a world of one."""
    world = _env_int("WORLD_SIZE")
    rank = _env_int("RANK")
    if world is None or rank is None:
        return 0, 1, 0, 1
    local_rank = _env_int("LOCAL_RANK")
    local_world = _env_int("LOCAL_WORLD_SIZE")
    return rank, world, rank if local_rank is None else local_rank, world if local_world is None else local_world


def _pick_device(local_rank: int) -> torch.device:
    if emulated() or not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


_generation = 0


def _start_process_group(device: torch.device, shared_gpu: bool, timeout_s: float, rank: int, world: int) -> bool:
    """Starts torch.distributed unless the user already did; returns whether we own it."""
    global _generation
    if dist.is_initialized():
        return False
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" and not shared_gpu else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if "MASTER_ADDR" in os.environ:
        store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
        # Each init gets its own keys, so an init after finalize (or after a failed init) never
        # meets the addresses that a destroyed group left in the store.
        store = dist.PrefixStore(f"symcomm/{_generation}", store)
        _generation += 1
    else:
        # Not under torchrun: a world of one needs no rendezvous.
        store = dist.HashStore()
    kwargs = {"device_id": device} if backend != "gloo" else {}
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout, **kwargs)
    return True


def problems_on_ranks(problem: str | None) -> str | None:
    """Collective: every rank's problem as "rank r: ...; ...", or None when no rank has one, so that
    all ranks take the same decision or raise the same error."""
    everyone: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, problem)
    return "; ".join(f"rank {r}: {p}" for r, p in enumerate(everyone) if p) or None


def _cuda_device_class():
    # The class nvshmem.core.init takes its `device` as, and calls methods of later: nvshmem4py 0.4.1
    # imports it from cuda.core (older cuda.core releases had it in cuda.core.experimental only).
    from cuda.core import Device

    return Device


def _start_nvshmem_host(state: _State) -> None:
    import nvshmem.core

    if state.shared_gpu:
        # One GPU: no NVLink switch to multicast through and no network to reach.
        os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")
        os.environ.setdefault("NVSHMEM_REMOTE_TRANSPORT", "none")
    torch.cuda.set_device(state.device)
    cuda_device = _cuda_device_class()(state.device.index)
    cuda_device.set_current()
    uid = nvshmem.core.get_unique_id(empty=state.rank != 0)
    box = [uid]
    dist.broadcast_object_list(box, src=0, device=torch.device("cpu"))
    nvshmem.core.init(device=cuda_device, uid=box[0], rank=state.rank, nranks=state.world_size, initializer_method="uid")
    state.nvshmem_up = True


def _start_emulated_host(state: _State, workspace_bytes: int) -> None:
    """What nvshmem4py's init does, on the emulated device: every rank's heap, mapped by every rank."""
    heap_bytes = -(-(workspace_bytes + (_env_int("SYMCOMM_EMU_HEAP_BYTES") or DEFAULT_EMU_HEAP_BYTES)) // 4096) * 4096
    # The segments are named for this job: rank 0's pid and the moment, the same on every rank.
    box = [f"{os.getpid()}-{time.monotonic_ns()}"]
    dist.broadcast_object_list(box, src=0)
    emu = load_extension().emu
    emu.configure(pes_per_node=_pes_per_node() or 0)
    emu.start_process(state.rank, state.world_size, heap_bytes, box[0], state.timeout_s)
    state.nvshmem_up = True
    state.heap = (emu.heap(state.rank), heap_bytes)
    state.free_blocks = {0: heap_bytes}


def _start_nvshmem(state: _State, workspace_bytes: int) -> None:
    if emulated():
        _start_emulated_host(state, workspace_bytes)
    else:
        _start_nvshmem_host(state)
    ext = load_extension()
    ext.init_device_state(state.timeout_s)
    if not emulated():
        state.capability = torch.cuda.get_device_capability(state.device)
    # The fused GEMM's core has no machine code for another GPU, so it is not loaded there (gemm.choose
    # never takes the fused path on it).
    ext.load_kernels(gemm_core=state.capability in (None, GEMM_CORE_CAPABILITY))
    state.workspace = _allocate(state, (workspace_bytes,), torch.uint8)
    # The kernels' barrier flags and counters live at the front of the workspace and only ever count
    # up; the heap is not zeroed, so zero them, and let nobody signal a peer before all have.
    state.workspace[: ext.workspace_data_offset()].zero_()
    _synchronize(state)
    dist.barrier()
    _learn_topology(state, ext)
    state.sms = EMULATED_SMS if emulated() else _agreed_sm_share(state)
    ext.set_max_blocks(blocks_cap(state.sms, ext.max_blocks))


def blocks_cap(sms: int, most: int) -> int:
    """Blocks per collective and MoE kernel: no more than this rank's SMs, whose sum over the ranks on a
    GPU fits in it, so that the blocks of every rank can run at once (their barriers wait for each other);
    and no more than the kernels' flags allow (`most`)."""
    return min(sms, most)


def _pes_per_node() -> int | None:
    per_node = _env_int(PES_PER_NODE_ENV)
    if per_node is not None and per_node < 0:
        raise ValueError(f"{PES_PER_NODE_ENV}={per_node}; expected ranks per node (0: the hosts say)")
    return per_node or None


def _node_names(state: _State) -> list[str]:
    """Each rank's node: its host, or the node SYMCOMM_PES_PER_NODE puts it on (the emulated device is
    one node unless it says otherwise)."""
    if (per_node := _pes_per_node()) or emulated():
        per_node = per_node or state.world_size
        return [f"{'emulated ' if emulated() else 'pretend '}node {r // per_node}" for r in range(state.world_size)]
    names: list[str | None] = [None] * state.world_size
    dist.all_gather_object(names, socket.gethostname())
    return names


def _learn_topology(state: _State, ext) -> None:
    """Which peers load/store reaches from every rank and which node each is on, logged one line per
    node; and the collectives' transport: "rma" where some peer is out of load/store reach or
    SYMCOMM_TRANSPORT=rma asks for it, else "p2p". The same on every rank."""
    forced = os.environ.get(TRANSPORT_ENV, "auto")
    if forced not in TRANSPORTS:
        raise ValueError(f"{TRANSPORT_ENV}={forced!r}; expected one of {TRANSPORTS}")
    rows: list[list[bool] | None] = [None] * state.world_size
    dist.all_gather_object(rows, list(ext.reachable_peers(state.workspace.data_ptr())))
    names = _node_names(state)
    unique = list(dict.fromkeys(names))
    node = [unique.index(n) for n in names]
    per_node = node.count(0)
    if 1 < per_node < state.world_size and node == [r // per_node for r in range(state.world_size)]:
        state.node_layout = (len(unique), per_node)
    state.all_reachable = all(map(all, rows))
    state.node_reachable = all(rows[r][q] for r in range(state.world_size) for q in range(state.world_size)
                               if node[r] == node[q])
    # The load/store kernels read at most max_peers PEs directly; a larger job takes the remote path.
    state.transport = "rma" if forced == "rma" or not state.all_reachable or state.world_size > ext.max_peers else "p2p"
    for k, name in enumerate(unique if state.rank == 0 else ()):
        pes = [r for r in range(state.world_size) if names[r] == name]
        reach = [q for q, ok in enumerate(rows[pes[0]]) if ok]
        log.info("symcomm topology: node %d (%s): PEs %s; load/store from PE %d reaches PEs %s; transport %s",
                 k, name, pes, pes[0], reach, state.transport)


def _synchronize(state: _State) -> None:
    """Waits for every kernel this rank queued."""
    if emulated():
        load_extension().emu.synchronize()
    else:
        torch.cuda.synchronize(state.device)


MPS_PERCENTAGE = "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"
MPS_CONTROL = "nvidia-cuda-mps-control"
MPS_PIPE_DEFAULT = "/tmp/nvidia-mps"


def _mps_server_answer(env: Mapping[str, str]) -> str | None:
    """The MPS server's answer to get_default_active_thread_percentage (or why there is none), or None
    where no server runs: no control program on PATH, or no pipe directory."""
    control = shutil.which(MPS_CONTROL, path=env.get("PATH"))
    if control is None or not os.path.isdir(env.get("CUDA_MPS_PIPE_DIRECTORY", MPS_PIPE_DEFAULT)):
        return None
    try:
        done = subprocess.run([control], input="get_default_active_thread_percentage\n", capture_output=True,
                              text=True, timeout=10, env=dict(env))
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"no answer ({e})"
    if done.returncode != 0:
        return f"exit status {done.returncode} ({done.stderr.strip()})"
    return done.stdout.strip()


def _percentage(raw: str) -> float | None:
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if 0 < value <= 100 else None


def _sm_share(sms: int, pes_per_gpu: int, env: Mapping[str, str], mps_answer: str | None) -> tuple[int, str]:
    """(how many SMs this PE's kernels may use, why), given `sms`, the count the GPU reports to this
    process (cudaDevAttrMultiProcessorCount), so that the blocks of every PE on the GPU can be resident at
    once (some wait for others).

    Under MPS a client may use its percentage of the GPU: CUDA_MPS_ACTIVE_THREAD_PERCENTAGE, or the
    server's default where that is lower (mps_answer: what _mps_server_answer returned), and the count
    it reads is already that share (the MPS documentation: the device attribute reflects the active
    thread percentage), so it is taken as it is. Without an MPS server the variable limits nothing. Where
    MPS enforces no share (no server, or 100%), or the shares add up to more than the GPU, the PE takes
    no more than an equal split among the PEs on the GPU, whose size is then estimated from the share.
    """
    raw = env.get(MPS_PERCENTAGE)
    asked = None if raw is None else _percentage(raw)
    if raw is not None and asked is None:
        raise ValueError(f"{MPS_PERCENTAGE}={raw!r} is not a percentage in (0, 100]")
    default = None if mps_answer is None else _percentage(mps_answer)
    if default is None:
        percent = 100.0
        why = "no MPS server" if mps_answer is None else f"no MPS server answered ({mps_answer!r})"
        if raw is not None:
            why += f", so {MPS_PERCENTAGE}={raw} limits nothing"
    elif asked is not None and asked < default:
        percent, why = asked, f"MPS at {MPS_PERCENTAGE}={raw}"
    else:
        percent, why = default, f"MPS at the server's default percentage, {mps_answer}"
    if percent < 100:
        why += ", which the count already reflects"
    gpu = int(sms * 100 / percent)  # the whole GPU: what the share is a percentage of
    share = sms
    if pes_per_gpu > 1 and gpu // pes_per_gpu < share:
        share = gpu // pes_per_gpu
        why += f"; split evenly among the {pes_per_gpu} PEs on the GPU's {'about ' if percent < 100 else ''}{gpu} SMs"
    return max(1, share), why


def _agreed_sm_share(state: _State) -> int:
    """This rank's SMs (see _sm_share), logged with the count the GPU reports, then the minimum over ranks."""
    sms = torch.cuda.get_device_properties(state.device).multi_processor_count
    share, why = _sm_share(sms, state.pes_per_gpu, os.environ, _mps_server_answer(os.environ))
    log.info("symcomm: rank %d may use %d SMs: the GPU reports %d (cudaDevAttrMultiProcessorCount, %s=%s); %s",
             state.rank, share, sms, MPS_PERCENTAGE, os.environ.get(MPS_PERCENTAGE, "unset"), why)
    agreed = torch.tensor([share])
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
    return int(agreed)


def _allocate(state: _State, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if state.backend == "nvshmem" and emulated():
        raw = _heap_allocate(state, max(nbytes, 16))
        dist.barrier()  # collective, as NVSHMEM's allocation is
    elif state.backend == "nvshmem":
        import nvshmem.core.interop.torch as nvshmem_torch

        # At least one element so that a zero-size tensor still has a heap address to free.
        raw = nvshmem_torch.tensor((max(nbytes, 16),), dtype=torch.uint8)
    else:
        raw = torch.empty((max(nbytes, 16),), dtype=torch.uint8, device=state.device)
    state.symmetric[raw.data_ptr()] = raw
    return raw[:nbytes].view(dtype).view(shape)


def _heap_allocate(state: _State, nbytes: int) -> torch.Tensor:
    """The first free block of the emulated heap that fits: every rank allocating the same sizes in the
    same order gets the same offsets, which is what makes the heap symmetric."""
    size = -(-nbytes // _ALIGN) * _ALIGN
    for offset, free in sorted(state.free_blocks.items()):
        if free >= size:
            del state.free_blocks[offset]
            if free > size:
                state.free_blocks[offset + size] = free - size
            buffer = (ctypes.c_char * size).from_address(state.heap[0] + offset)
            return torch.frombuffer(buffer, dtype=torch.uint8)
    raise RuntimeError(f"empty: the emulated symmetric heap ({state.heap[1]} bytes) has no {size} bytes free; "
                       "set SYMCOMM_EMU_HEAP_BYTES larger")


def _heap_free(state: _State, raw: torch.Tensor) -> None:
    offset, size = raw.data_ptr() - state.heap[0], raw.numel()
    following = state.free_blocks.pop(offset + size, 0)
    before = [o for o, n in state.free_blocks.items() if o + n == offset]
    if before:
        state.free_blocks[before[0]] += size + following
    else:
        state.free_blocks[offset] = size + following


def _free(state: _State, raw: torch.Tensor) -> None:
    del state.symmetric[raw.data_ptr()]
    if state.backend == "nvshmem" and emulated():
        _heap_free(state, raw)
    elif state.backend == "nvshmem":
        import nvshmem.core.interop.torch as nvshmem_torch

        nvshmem_torch.free_tensor(raw)


def init(backend: str = "auto", workspace_bytes: int | None = None, timeout_s: float | None = None) -> str:
    """Starts symcomm in this process (under torchrun, or alone as a world of one).

    backend: "nvshmem" (CUDA kernels over the symmetric heap), "torch" (torch.distributed), or
    "auto" (nvshmem when every rank can run it, else torch; the reason is logged).
    workspace_bytes: the symmetric workspace allocated up front so that ops never allocate, e.g.
    inside a CUDA-graph capture (default SYMCOMM_WORKSPACE_BYTES or 64 MiB).
    timeout_s: how long device-side waits and the process group wait for a peer before raising
    (default SYMCOMM_TIMEOUT_S or 60).

    Calling init again with the same arguments does nothing; with different ones it raises.
    Returns the backend in use.
    """
    global _state
    if backend not in BACKENDS:
        raise ValueError(f"init: backend must be one of {BACKENDS}, got {backend!r}")
    if workspace_bytes is None:
        workspace_bytes = _env_int("SYMCOMM_WORKSPACE_BYTES") or DEFAULT_WORKSPACE_BYTES
    if isinstance(workspace_bytes, bool) or not isinstance(workspace_bytes, int) or workspace_bytes <= 0:
        raise ValueError(f"init: workspace_bytes must be a positive int, got {workspace_bytes!r}")
    if timeout_s is None:
        timeout_s = _env_float("SYMCOMM_TIMEOUT_S", DEFAULT_TIMEOUT_S)
    if not isinstance(timeout_s, (int, float)) or timeout_s <= 0:
        raise ValueError(f"init: timeout_s must be a positive number, got {timeout_s!r}")

    args = (backend, workspace_bytes, float(timeout_s))
    if _state is not None:
        if args != _state.init_args:
            raise RuntimeError(
                f"init: symcomm is already initialised with (backend, workspace_bytes, timeout_s)={_state.init_args}; "
                f"call finalize() before init{args}"
            )
        return _state.backend

    rank, world, local_rank, local_world = _rank_env()
    device = _pick_device(local_rank)
    shared_gpu = device.type == "cuda" and local_world > torch.cuda.device_count()
    pes_per_gpu = len(range(device.index, local_world, torch.cuda.device_count())) if device.type == "cuda" else 1
    owns_pg = _start_process_group(device, shared_gpu, timeout_s, rank, world)
    if dist.get_world_size() != world and "WORLD_SIZE" in os.environ:
        raise RuntimeError(f"init: torch.distributed has {dist.get_world_size()} ranks but WORLD_SIZE={world}")
    rank, world = dist.get_rank(), dist.get_world_size()

    state = _State("torch", rank, world, device, float(timeout_s), owns_pg, shared_gpu, pes_per_gpu, init_args=args)
    try:
        state.backend = _choose_backend(backend, device, rank)
        if state.backend == "nvshmem":
            _start_nvshmem(state, workspace_bytes)
    except BaseException:
        _teardown(state)
        raise
    _state = state
    return state.backend


def _choose_backend(requested: str, device: torch.device, rank: int) -> str:
    if requested == "torch":
        return "torch"
    summary = problems_on_ranks(_nvshmem_unavailable_reason(device))
    if summary is None:
        return "nvshmem"
    if requested == "nvshmem":
        raise RuntimeError(f"init(backend='nvshmem'): the nvshmem backend is unavailable ({summary})")
    if rank == 0:
        level = logging.WARNING if device.type == "cuda" else logging.INFO
        log.log(level, "symcomm: using the torch backend because %s", summary)
    return "torch"


def finalize() -> None:
    """Frees every symmetric tensor and shuts NVSHMEM down; a no-op when not initialised.

    Collective: every rank must call it.
    """
    global _state
    state = _state
    if state is None:
        return
    _state = None
    _teardown(state)


def _teardown(state: _State) -> None:
    """Undoes what init did, as far as it got."""
    if state.nvshmem_up:
        _quiesce(state)
        load_extension().finalize_device_state()
        for raw in list(state.symmetric.values()):
            _free(state, raw)
        if emulated():
            load_extension().emu.stop()
        else:
            import nvshmem.core

            nvshmem.core.finalize()
    state.symmetric.clear()
    if state.owns_process_group:
        dist.destroy_process_group()


def _get() -> _State:
    if _state is None:
        raise NotInitializedError("symcomm is not initialised: call symcomm.init() first")
    return _state


def is_initialized() -> bool:
    return _state is not None


def backend() -> str:
    return _get().backend


def rank() -> int:
    return _get().rank


def world_size() -> int:
    return _get().world_size


def device() -> torch.device:
    """The device symcomm ops expect their tensors on (cuda:N on the nvshmem backend)."""
    return _get().device


def timeout_s() -> float:
    return _get().timeout_s


def shared_gpu() -> bool:
    """Whether several ranks share this GPU (so the process group is gloo only)."""
    return _get().shared_gpu


def sm_count() -> int:
    """The SMs this rank's kernels may use (nvshmem backend; the same on every rank)."""
    return _get().sms


def workspace() -> torch.Tensor | None:
    """The symmetric workspace (uint8) on the nvshmem backend; None on the torch backend."""
    return _get().workspace


def transport() -> str | None:
    """How the nvshmem backend's collectives reach their peers: "p2p" (load/store through peer
    pointers: one NVLink domain, or ranks sharing a GPU) or "rma" (NVSHMEM puts with signal: peers
    on other nodes, or SYMCOMM_TRANSPORT=rma); None on the torch backend."""
    state = _get()
    return state.transport if state.backend == "nvshmem" else None


def node_layout() -> tuple[int, int] | None:
    """(nodes, ranks per node) where the ranks sit on several nodes, the same number on each and in rank
    order (as torchrun places them), several per node; else None (nvshmem backend; None on torch)."""
    return _get().node_layout


def node_reachable() -> bool:
    """Whether load/store reaches, from every PE, every PE of its own node (what the hierarchical MoE
    kernels need inside a node)."""
    return _get().node_reachable


def all_reachable() -> bool:
    """Whether load/store reaches every PE from every PE (what the fused GEMM and MoE kernels need)."""
    return _get().all_reachable


def capability() -> tuple[int, int] | None:
    """The GPU's compute capability (major, minor) on the nvshmem backend; None on the torch backend and
    on the emulated device."""
    return _get().capability


def mpg_status() -> int | None:
    """NVSHMEM's init status: 3 = limited MPG, 4 = full MPG; None on the torch backend."""
    state = _get()
    return load_extension().init_status() if state.backend == "nvshmem" else None


def _check_shape(shape) -> tuple[int, ...]:
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = (shape,)
    if not isinstance(shape, (tuple, list, torch.Size)):
        raise TypeError(f"empty: shape must be a tuple of ints, got {type(shape).__name__}")
    for i, n in enumerate(shape):
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"empty: shape[{i}] must be an int, got {n!r}")
        if n < 0:
            raise ValueError(f"empty: shape[{i}] must be >= 0, got {n}")
    return tuple(shape)


def empty(shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A tensor on the symmetric heap (nvshmem backend) or a plain tensor (torch backend).

    Collective on the nvshmem backend: every rank must allocate the same shapes in the same order.
    The tensor lives until free(t) or finalize().
    """
    shape = _check_shape(shape)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"empty: dtype must be a torch.dtype, got {dtype!r}")
    return _allocate(_get(), shape, dtype)


def _allocation_of(t: torch.Tensor) -> torch.Tensor | None:
    state = _get()
    if not isinstance(t, torch.Tensor) or t.device != state.device:
        return None
    return state.symmetric.get(t.untyped_storage().data_ptr())


def is_symmetric(t: torch.Tensor) -> bool:
    """Whether t lives in a tensor made by symcomm.empty (or is a view of one)."""
    return _allocation_of(t) is not None


def _quiesce(state: _State) -> None:
    """Returns once no kernel of any rank can still touch the symmetric heap: ours have finished (also
    those reading peers' memory), and so have every other rank's."""
    _synchronize(state)
    dist.barrier()


def free(t: torch.Tensor) -> None:
    """Frees a tensor made by symcomm.empty. Collective on the nvshmem backend, where it first waits for
    the work queued so far on every rank: a kernel may still read the tensor, here or on a peer, and the
    next empty() may hand its memory out again."""
    state = _get()
    raw = _allocation_of(t)
    if raw is None or raw is state.workspace:
        raise ValueError("free: t is not a live tensor allocated by symcomm.empty (freed already, or not symmetric)")
    if state.backend == "nvshmem":
        _quiesce(state)
    _free(state, raw)
