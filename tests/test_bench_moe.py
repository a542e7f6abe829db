"""The MoE benchmark on the session's backend, at tiny sizes: every row timed, checked and written."""

import argparse
import json

import pytest
import torch

from symcomm.bench import moe

pytestmark = pytest.mark.dist

TINY = (moe.Config("tiny", 8, 2, 16), moe.Config("tiny-top1", 8, 1, 32))


def test_rows_are_timed_checked_and_written(world, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(moe, "GPU_CONFIGS", TINY)
    monkeypatch.setattr(moe, "CPU_CONFIGS", TINY)
    monkeypatch.setattr(moe, "GPU_TOKENS", (1, 5))
    monkeypatch.setattr(moe, "CPU_TOKENS", (1, 5))
    moe.main(argparse.Namespace(dtype=None, warmup=1, iters=2, out=tmp_path, backend=world.backend))
    if world.rank != 0:
        return
    written = json.loads((tmp_path / f"moe-w{world.world_size}.json").read_text())
    rows = written["rows"]
    # The plot draws exactly the table's columns: per op and config, ours then the baseline's latencies.
    for op, lines in moe.series([moe.Row(**r) for r in rows], written["header"]).items():
        expected = []
        for config in ("tiny", "tiny-top1"):
            mine = [r for r in rows if r["config"] == config]
            expected += [([r["tokens"] for r in mine], [r[f"{op}_us"] for r in mine]),
                         ([r["tokens"] for r in mine], [r[f"base_{op}_us"] for r in mine])]
        assert [(xs, ys) for _, xs, ys in lines] == expected
    assert [(r["config"], r["tokens"]) for r in rows] == [("tiny", 1), ("tiny", 5), ("tiny-top1", 1), ("tiny-top1", 5)]
    assert all(r["correct"] for r in rows)
    assert all(r["dispatch_us"] > 0 and r["base_combine_us"] > 0 and r["capacity"] >= 1 for r in rows)
    # Logical bandwidth: tokens x top-k x hidden x itemsize per rank.
    logical = 5 * 2 * 16 * getattr(torch, rows[1]["dtype"]).itemsize
    assert rows[1]["dispatch_gbs"] == pytest.approx(logical / rows[1]["dispatch_us"] / 1e3)
    assert (tmp_path / f"moe-w{world.world_size}.csv").read_text().count("\n") == 5
    assert (tmp_path / f"moe-w{world.world_size}.png").stat().st_size > 0
    assert capsys.readouterr().out.count(" ok") == 4
