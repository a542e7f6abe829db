"""Timing, cross-rank aggregation and reporting shared by every benchmark."""

from __future__ import annotations

import csv
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from symcomm import runtime


@dataclass
class Row:
    op: str
    algorithm: str
    transport: str  # how ours reached its peers: p2p, rma (nvshmem backend), or torch.distributed
    bytes: int
    count: int
    dtype: str
    time_us: float  # eager: median over iterations, max over ranks
    graph_us: float | None  # replayed from a CUDA graph (GPU only)
    algbw_gbs: float  # from the better of the two times
    busbw_gbs: float
    baseline_us: float
    baseline_busbw_gbs: float  # from the baseline's own time
    speedup: float  # baseline time / our better time
    hbm_fraction: float | None  # bytes the algorithm moves through HBM / time / measured copy bandwidth
    correct: bool


def parse_bytes(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B")
    unit = text[-1] if text and text[-1] in units else ""
    try:
        return int(float(text.removesuffix(unit)) * units[unit])
    except ValueError:
        raise ValueError(f"not a size: {text!r} (examples: 1024, 64K, 256M, 1G)") from None


def size_sweep(lo: int, hi: int, factor: int) -> list[int]:
    sizes, n = [], lo
    while n <= hi:
        sizes.append(n)
        n *= factor
    return sizes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_us(fn: Callable[[], object], device: torch.device, warmup: int, iters: int, together: bool = True) -> float:
    """Median wall time of one call, in microseconds; with `together`, all ranks start each call at once."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        _sync(device)
        if together:
            dist.barrier()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(samples)


class progress:
    """A progress bar on one rank (rich), nothing elsewhere."""

    def __init__(self, name: str, total: int, enabled: bool):
        self._bar = None
        if enabled:
            from rich.progress import Progress

            self._bar = Progress(transient=True)
            self._task = self._bar.add_task(name, total=total)

    def __enter__(self):
        if self._bar:
            self._bar.start()
        return self

    def __exit__(self, *exc):
        if self._bar:
            self._bar.stop()

    def advance(self) -> None:
        if self._bar:
            self._bar.advance(self._task)


def symmetric_copy(x: torch.Tensor) -> torch.Tensor:
    s = runtime.empty(tuple(x.shape), x.dtype)
    s.copy_(x)
    return s


def all_ranks(ok: bool) -> bool:
    flag = torch.tensor([int(ok)])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag)


def max_over_ranks(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def ceilings(device: torch.device) -> dict[str, float]:
    """The two physical ceilings every GPU number is read against, measured now on this GPU (no
    process group needed): device-to-device copy bandwidth counting bytes read plus written, and the
    bf16 8192^3 matmul rate, on random data."""
    if device.type != "cuda":
        return {}
    n = 1 << 28  # 256 MiB: far past the L2
    src = torch.randn(n // 4, device=device)
    dst = torch.empty_like(src)
    copy = time_us(lambda: dst.copy_(src), device, 3, 20, together=False)
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    mm = time_us(lambda: a @ b, device, 3, 10, together=False)
    return {"d2d_copy_gbs": 2 * n / copy / 1e3, "bf16_matmul_tflops": 2 * 8192**3 / mm / 1e6}


def op_overhead_us(device: torch.device) -> float:
    """Host time of one eager all_reduce of an empty tensor: dispatch and checks, no data, no kernel."""
    x = torch.empty(0, device=device)
    op = torch.ops.symcomm.all_reduce
    for _ in range(100):
        op(x)
    start = time.perf_counter()
    for _ in range(1000):
        op(x)
    return (time.perf_counter() - start) * 1e3


def environment() -> dict[str, object]:
    dev = runtime.device()
    info: dict[str, object] = {
        "backend": runtime.backend(),
        "world_size": runtime.world_size(),
        # The emulated device runs the kernels on the CPU: its rows check correctness, its times are no GPU's.
        "device": "emulated (csrc/emu/ on the CPU: times are not GPU numbers)" if runtime.emulated() else str(dev),
        "torch": torch.__version__,
        "pg_backend": str(dist.get_backend()),
    }
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
        info["mpg_status"] = runtime.mpg_status()
        info["ranks_share_gpu"] = runtime.shared_gpu()
    return info


def format_table(rows: list, columns: list[tuple[str, Callable, str]]) -> str:
    """Rows as right-aligned text columns; each column is (title, value of a row, format spec), and a
    value of None prints as "-"."""
    cells = [[("-" if (v := get(r)) is None else format(v, spec)) for _, get, spec in columns] for r in rows]
    widths = [max([len(title)] + [len(row[i]) for row in cells]) for i, (title, _, _) in enumerate(columns)]
    lines = [[title for title, _, _ in columns], *cells]
    return "\n".join(" ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines)


def check(ok: bool) -> str:
    return "ok" if ok else "WRONG"


def table(rows: list[Row]) -> str:
    return format_table(rows, [
        ("size (B)", lambda r: r.bytes, "d"), ("count", lambda r: r.count, "d"), ("dtype", lambda r: r.dtype, ""),
        ("algorithm", lambda r: r.algorithm, ""), ("path", lambda r: r.transport, ""), ("eager (us)", lambda r: r.time_us, ".1f"),
        ("graph (us)", lambda r: r.graph_us, ".1f"), ("algbw GB/s", lambda r: r.algbw_gbs, ".2f"),
        ("busbw GB/s", lambda r: r.busbw_gbs, ".2f"), ("base (us)", lambda r: r.baseline_us, ".1f"),
        ("base busbw", lambda r: r.baseline_busbw_gbs, ".2f"), ("speedup", lambda r: r.speedup, ".2f"), ("of copy", lambda r: r.hbm_fraction, ".0%"),
        ("check", lambda r: check(r.correct), ""),
    ])


def write_rows(out_dir: Path, stem: str, rows: list, header: dict[str, object]) -> list[Path]:
    """Any benchmark's rows (dataclasses) as <stem>.json (with the header) and <stem>.csv."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out_dir / f"{stem}.json", out_dir / f"{stem}.csv"
    json_path.write_text(json.dumps({"header": header, "rows": [asdict(r) for r in rows]}, indent=1))
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        w.writeheader()
        w.writerows(asdict(r) for r in rows)
    return [json_path, csv_path]


def write(out_dir: Path, stem: str, rows: list[Row], header: dict[str, object], baseline: str) -> list[Path]:
    """A collective's rows: JSON, CSV and the bandwidth plot."""
    png = out_dir / f"{stem}.png"
    paths = write_rows(out_dir, stem, rows, header)
    _plot(png, stem, rows, header, baseline)
    return [*paths, png]


def series(rows: list[Row], header: dict[str, object], baseline: str) -> list[tuple[str, list, list]]:
    """What the plot draws, (label, sizes, bus bandwidths): columns of the table, nothing computed anew."""
    out = []
    for algorithm in dict.fromkeys(r.algorithm for r in rows):
        mine = [r for r in rows if r.algorithm == algorithm]
        out.append((f"symcomm ({header['backend']}, {algorithm})", [r.bytes for r in mine], [r.busbw_gbs for r in mine]))
    # The baseline is timed once per size, whatever the algorithm.
    sizes = dict((r.bytes, r.baseline_busbw_gbs) for r in rows)
    out.append((f"baseline ({baseline})", list(sizes), list(sizes.values())))
    return out


def _plot(path: Path, stem: str, rows: list[Row], header: dict[str, object], baseline: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, xs, ys in series(rows, header, baseline):
        ax.plot(xs, ys, "s--" if label.startswith("baseline") else "o-", label=label)
    if "d2d_copy_gbs" in header:
        ax.axhline(header["d2d_copy_gbs"], color="grey", lw=0.8, label="device-to-device copy")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("message size (bytes)")
    ax.set_ylabel("bus bandwidth (GB/s)")
    ax.set_title(f"{stem}: {header.get('gpu', header['device'])}, {header['world_size']} ranks")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
