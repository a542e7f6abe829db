"""The GEMM benchmarks on the session's backend, at tiny shapes: every row timed, checked and written."""

import argparse
import dataclasses
import json
import math

import pytest
import torch

from symcomm.bench import gemm

pytestmark = pytest.mark.dist

# K and N divisible by 2, 3 and 4 ranks.
TINY = {"row": (gemm.Shape("tiny", 48, 8), gemm.Shape("tiny-wide", 24, 24)), "column": (gemm.Shape("tiny", 16, 48),)}
MS = (1, 3, 8)


@pytest.fixture
def tiny(monkeypatch):
    for device in ("GPU", "CPU"):
        monkeypatch.setattr(gemm, f"{device}_SHAPES", TINY)
        monkeypatch.setattr(gemm, f"{device}_MS", MS)


def test_rows_are_timed_checked_and_written(world, tiny, tmp_path, capsys):
    gemm.main(argparse.Namespace(op="gemm", dtype=None, warmup=1, iters=2, out=tmp_path))
    if world.rank != 0:
        return
    w = world.world_size
    printed = capsys.readouterr().out
    total = 0
    for name, bench in gemm.BENCHES.items():
        stem = tmp_path / f"{name}-w{w}"
        written = json.loads(stem.with_suffix(".json").read_text())
        rows = written["rows"]
        # The plot draws exactly the table's columns (json.dumps: NaN, a fused path that cannot run, equals itself).
        drawn = gemm.series([gemm.Row(**r) for r in rows], written["header"])
        for shape, lines in drawn.items():
            mine = [r for r in rows if r["shape"] == shape]
            assert json.dumps([(ms, times) for _, ms, times in lines]) == json.dumps(
                [([r["m"] for r in mine], [r[f"{t}_us"] for r in mine]) for t in ("fused", "unfused", "baseline", "matmul")])
        # Where M is split over the ranks it is rounded up to a multiple of the world.
        ms = list(dict.fromkeys(-(-m // w) * w for m in MS)) if bench.splits_m else list(MS)
        shapes = TINY[bench.parallel]
        assert [(r["shape"], r["m"]) for r in rows] == [(s.name, m) for s in shapes for m in ms]
        for r in rows:
            shape = next(s for s in shapes if s.name == r["shape"])
            row_parallel = bench.parallel == "row"
            assert (r["k"], r["n"]) == ((shape.k // w, shape.n) if row_parallel else (shape.k, shape.n // w))
            # On the nvshmem backend 'auto' takes one of the op's two paths (gemm.choose).
            assert r["correct"] and r["path"] in (("matmul+collective",) if world.backend == "torch" else ("fused", "unfused"))
            assert all(r[f"{t}_us"] > 0 for t in ("matmul", "comm", "unfused", "baseline"))
            if math.isnan(r["fused_us"]):
                # The fused kernels take K and N multiples of 8 (gemm.fused_plan); the torch backend always times its op.
                assert world.backend == "nvshmem" and (r["k"] % 8 or r["n"] % 8), r
                continue
            assert r["fused_us"] > 0
            assert r["speedup"] == pytest.approx(r["unfused_us"] / r["fused_us"])
            assert r["overlap"] == pytest.approx((r["matmul_us"] + r["comm_us"] - r["fused_us"])
                                                 / min(r["matmul_us"], r["comm_us"]))
            assert r["tflops"] == pytest.approx(2 * r["m"] * r["k"] * r["n"] / r["fused_us"] / 1e6)
        assert stem.with_suffix(".csv").read_text().count("\n") == len(rows) + 1
        assert stem.with_suffix(".png").stat().st_size > 0
        assert f"# {name}: " in printed
        total += len(rows)
    assert printed.count(" ok\n") == total


def test_the_check_catches_a_missing_reduction(world, monkeypatch):
    if world.world_size == 1:
        pytest.skip("a world of one has nothing to reduce")
    local_only = dataclasses.replace(gemm.BENCHES["gemm-all-reduce"], op=lambda a, b: a @ b)
    monkeypatch.setitem(gemm.BENCHES, "gemm-all-reduce", local_only)
    rows = gemm.run("gemm-all-reduce", TINY["row"][:1], (2,), torch.float32, warmup=1, iters=1)
    assert not rows[0].correct


def test_the_cut_point_is_where_fused_starts_winning_for_good():
    def rows(shape, times):  # (M, fused us, unfused us)
        return [gemm.Row("gemm-all-reduce", shape, m, 8, 8, "bfloat16", "fused", 1.0, 1.0, unfused, 1.0, fused,
                         unfused / fused, 0.0, 1.0, True) for m, fused, unfused in times]

    wins_late = rows("a", [(1, 5, 1), (64, 1, 2), (128, 3, 2), (256, 1, 2), (512, 1, 2)])
    assert gemm.fused_min_m(wins_late) == 256
    assert gemm.fused_min_m(wins_late + rows("b", [(1, 1, 2), (512, 1, 2)])) == 256
    assert gemm.fused_min_m(wins_late + rows("c", [(1, 1, 2), (300, 2, 1), (512, 1, 2)])) == 512
    assert gemm.fused_min_m(rows("d", [(1, 1, 2), (512, float("nan"), 2)])) is None
