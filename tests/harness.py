"""Helpers shared by the test files: rank info, inputs for every rank, references, tolerances."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

# Error bound ||out - ref|| / ||scale|| against a float64 reference, where scale is what rounding
# errors are proportional to: the reference itself for copies, sum_r |x_r| for sums (a sum that
# cancels to nearly zero still carries the rounding of its partial sums), |a| @ |b| for products.
TOLERANCE = {
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


def rel_error(out: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    out64, ref64 = out.double().cpu(), ref.double().cpu()
    if torch.isnan(out64).any():
        return float("inf")
    norm = (ref64 if scale is None else scale.double().cpu()).norm()
    return float((out64 - ref64).norm() / norm.clamp_min(1e-300))


def assert_close(out: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor | None = None, *,
                 dtype: torch.dtype | None = None) -> None:
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    tol = TOLERANCE[dtype or out.dtype]
    err = rel_error(out, ref, scale)
    assert err <= tol, f"relative error {err:.3g} > {tol:.1g} ({out.dtype})"


def sum_ref(xs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 sum of every rank's tensor, and the scale of its rounding error."""
    return sum(x.double() for x in xs), sum(x.double().abs() for x in xs)


def gemm_ref(a_all: list[torch.Tensor], b_all: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_r a_r @ b_r in float64, and the scale of its rounding error, sum_r |a_r| @ |b_r|."""
    ref = sum(a.double() @ b.double() for a, b in zip(a_all, b_all))
    scale = sum(a.double().abs() @ b.double().abs() for a, b in zip(a_all, b_all))
    return ref, scale


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
