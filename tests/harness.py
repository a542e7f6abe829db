"""Helpers shared by the test files: rank info, inputs for every rank, references, tolerances."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

# Whole-result bound ||out - ref|| / ||ref|| for results of whole layers, where no per-element
# rounding model is derived (assert_close without a scale).
LAYER_TOLERANCE = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 2e-2,
}


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    device: torch.device
    backend: str
    seed: int


def every_rank(gen: torch.Generator, world_size: int, shape, dtype, device) -> list[torch.Tensor]:
    """One random tensor per rank (the same list on every rank): normal floats, or small nonzero-mean
    integers for integer and float8 dtypes so that sums and copies can be compared exactly."""
    out = []
    for _ in range(world_size):
        if dtype.is_floating_point and dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
            t = torch.randn(shape, generator=gen, dtype=torch.float64)
        else:
            t = torch.randint(1, 8, shape, generator=gen, dtype=torch.int64)
        out.append(t.to(dtype).to(device))
    return out


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.double().cpu(), ref.double().cpu()
    if torch.isnan(out64).any():
        return float("inf")
    return float((out64 - ref64).norm() / ref64.norm().clamp_min(1e-300))


def _violations(out: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> str:
    """'' when |out - ref| <= eps(dtype) * scale for every element (NaN fails), else what failed where."""
    bound = torch.finfo(dtype).eps * scale.double()
    err = (out.double() - ref.double()).abs()
    bad = ~(err <= bound)
    if not bad.any():
        return ""
    at = tuple(int(i) for i in bad.nonzero()[0])
    return (f"{int(bad.sum())} of {bad.numel()} elements off, first at {at}: got {float(out[at]):.6g}, expected "
            f"{float(ref[at]):.6g}, |error| {float(err[at]):.3g} > bound {float(bound[at]):.3g} ({dtype})")


def assert_close(out: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor | None = None, *,
                 dtype: torch.dtype | None = None) -> None:
    """With a scale: element by element, |out - ref| <= eps(dtype) * scale, where scale bounds that
    element's rounding error in units of the dtype's rounding (it counts the roundings: see sum_ref and
    gemm_ref). Without one (results of whole layers): ||out - ref|| / ||ref|| <= LAYER_TOLERANCE."""
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    dtype = dtype or out.dtype
    if scale is not None:
        problem = _violations(out, ref.to(out.device), scale.to(out.device), dtype)
        assert not problem, problem
        return
    tol = LAYER_TOLERANCE[dtype]
    err = rel_error(out, ref)
    assert err <= tol, f"relative error {err:.3g} > {tol:.1g} ({out.dtype})"


def sum_ref(xs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 sum of every rank's tensor, and the scale of its rounding error: one rounding per
    rank at most (a ring's partial sums), each bounded by sum_r |x_r|."""
    return sum(x.double() for x in xs), len(xs) * sum(x.double().abs() for x in xs)


def _accumulation(dtype: torch.dtype) -> float:
    """Rounding of the GEMMs' accumulator (float32 for the 16-bit and float32 types) in units of eps(dtype)."""
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps / torch.finfo(dtype).eps


def gemm_ref(a_all: list[torch.Tensor], b_all: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_r a_r @ b_r in float64, and the scale of its rounding error per element: each rank's partial
    rounded to the dtype, the sum rounded once per rank, and the accumulation over K (a random walk:
    sqrt(K) roundings, each at most |a| @ |b|)."""
    dtype, k = a_all[0].dtype, a_all[0].shape[-1]
    parts = [a.double() @ b.double() for a, b in zip(a_all, b_all)]
    ref = sum(parts)
    rounding = ref.abs() + len(parts) * sum(p.abs() for p in parts)
    accumulation = sum(a.double().abs() @ b.double().abs() for a, b in zip(a_all, b_all))
    return ref, rounding + k ** 0.5 * _accumulation(dtype) * accumulation


def assert_gemm_close(out: torch.Tensor, a_all: list[torch.Tensor], b_all: list[torch.Tensor],
                      bias: torch.Tensor | None = None, rows: slice = slice(None), gathered: bool = False) -> None:
    """out == rows `rows` of sum_r a_r @ b_r (+ bias), or with gathered=True, of cat_r(a_r) @ b_r[0],
    element by element (assert_close with gemm_ref's scale). Also shows that this very check rejects
    the wrong answers a fused GEMM could give: zeros, one rank's contribution missing, one stale tile,
    one row missing."""
    dtype = out.dtype
    if gathered:
        a_all, b_all = [torch.cat(a_all)], b_all[:1]
    ref, scale = gemm_ref(a_all, b_all)
    if gathered:
        # One rank's rows missing: its block of the gathered product.
        block = ref.shape[0] // len(a_all) if len(a_all) > 1 else ref.shape[0]
        missing = ref.clone()
        missing[-block:] = 0
    else:
        missing = ref - a_all[0].double() @ b_all[0].double()
    if bias is not None:
        ref, scale = ref + bias.double(), scale + ref.abs() + bias.double().abs()
        missing = missing + bias.double()
    ref, scale, missing = ref[rows], scale[rows], missing[rows]
    assert_close(out, ref, scale, dtype=dtype)
    stale = ref.clone()
    tile = stale[:128, :256]
    tile.copy_(tile.roll(1, 0) if tile.shape[0] > 1 else -tile)
    row = ref.clone()
    row[row.shape[0] // 2] = 0
    for name, wrong in (("zeros", torch.zeros_like(ref)), ("a missing rank", missing), ("a stale tile", stale),
                        ("a missing row", row)):
        assert _violations(wrong.to(dtype).to(out.device), ref.to(out.device), scale.to(out.device), dtype), \
            f"the check would accept {name}"


def run_alone(tmp_path: Path, script: str) -> subprocess.CompletedProcess:
    """Runs a Python script in a fresh process outside torchrun (a world of one), for checks that
    leave a process unusable, such as a kernel that traps."""
    path = tmp_path / "alone.py"
    path.write_text(script)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    return subprocess.run([sys.executable, str(path)], env=env, capture_output=True, text=True, timeout=120)


def read(address: int, nbytes: int) -> torch.Tensor:
    """A copy of the nbytes at a host address (what a stand-in for a kernel reads)."""
    return torch.frombuffer(bytearray((ctypes.c_char * nbytes).from_address(address)), dtype=torch.uint8) \
        if nbytes else torch.empty(0, dtype=torch.uint8)


def write(address: int, data: torch.Tensor) -> None:
    ctypes.memmove(address, data.contiguous().data_ptr(), data.numel() * data.element_size())


class Memory:
    """Where a stand-in's launches may touch memory, for the host-side plan tests: the workspace's
    data area (staging, partials, results), symmetric tensors (which peers read in place), the
    tensors the op allocated while it ran (its outputs) and the operands the test gave it.

    `recording()` stands in for a module's `torch`, so that what the module allocates with
    torch.empty / empty_like is known, and poisoned (all bits set) as a fresh GPU block may be; `area` asserts that a launch's range lies in the kind of memory
    it names; `disjoint` that the areas one launch uses do not overlap."""

    def __init__(self, workspace: torch.Tensor, data_offset: int):
        self.workspace = workspace
        self.data = (workspace.data_ptr() + data_offset, workspace.data_ptr() + workspace.numel())
        self.allocated: list[torch.Tensor] = []
        self.operands: list[torch.Tensor] = []

    def recording(self, real=torch):
        memory = self

        class Recording:
            def __getattr__(self, name):
                return getattr(real, name)

            def empty(self, *args, **kwargs):
                return memory._poisoned(real.empty(*args, **kwargs))

            def empty_like(self, *args, **kwargs):
                return memory._poisoned(real.empty_like(*args, **kwargs))

        return Recording()

    def _poisoned(self, t: torch.Tensor) -> torch.Tensor:
        # All bits set: NaN for floats, -1 or the maximum for integers, so a byte left unwritten shows.
        t.untyped_storage().fill_(0xFF)
        self.allocated.append(t)
        return t

    @staticmethod
    def _span(t: torch.Tensor) -> tuple[int, int]:
        storage = t.untyped_storage()
        return storage.data_ptr(), storage.data_ptr() + storage.nbytes()

    def _areas(self, kind: str) -> list[tuple[int, int]]:
        from symcomm import runtime

        if kind == "data":
            return [self.data]
        if kind == "symmetric":
            # In place: any symmetric tensor but the workspace, whose barrier area is the kernels' own.
            return [self.data] + [self._span(t) for t in runtime._get().symmetric.values() if t is not self.workspace]
        if kind == "output":
            return [self._span(t) for t in self.allocated]
        assert kind == "operand", kind
        return [self._span(t) for t in self.operands + self.allocated]

    def area(self, name: str, lo: int, nbytes: int, kind: str) -> tuple[int, int]:
        """[lo, lo + nbytes) of launch argument `name`, asserted to lie inside one area of `kind`."""
        hi = lo + nbytes
        if nbytes:
            assert any(a <= lo and hi <= b for a, b in self._areas(kind)), \
                f"{name} [{lo:#x}, {hi:#x}) is not inside the {kind} memory it must be in"
        return lo, hi

    @staticmethod
    def disjoint(**ranges: tuple[int, int]) -> None:
        items = [(name, lo, hi) for name, (lo, hi) in ranges.items() if hi > lo]
        for i, (n1, lo1, hi1) in enumerate(items):
            for n2, lo2, hi2 in items[i + 1:]:
                assert hi1 <= lo2 or hi2 <= lo1, f"{n1} [{lo1:#x}, {hi1:#x}) overlaps {n2} [{lo2:#x}, {hi2:#x})"


def on_gpu(world, seed: int, shape, dtype) -> list[torch.Tensor]:
    """Every rank's input, made on this rank's GPU from a seed all ranks share (no host copies)."""
    g = torch.Generator(device=world.device)
    out = []
    for r in range(world.world_size):
        g.manual_seed(seed * 1000 + r)
        if dtype.is_floating_point and dtype.itemsize > 1:
            out.append(torch.randn(shape, generator=g, device=world.device).to(dtype))
        else:
            out.append(torch.randint(1, 8, shape, generator=g, device=world.device).to(dtype))
    return out


def seed_of(gen) -> int:
    return int(torch.randint(0, 2**20, (1,), generator=gen))
