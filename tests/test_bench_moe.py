"""The MoE benchmark on the session's backend, at tiny sizes: every row timed, checked and written."""

import argparse
import json

import pytest
import torch

import symcomm
from symcomm import runtime
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
    # Hierarchical where the remote path spans nodes whose ranks load/store reaches.
    hierarchical = symcomm.transport() == "rma" and runtime.node_layout() and runtime.node_reachable()
    assert {r["path"] for r in rows} == {(symcomm.transport() or "torch.distributed") + "/hierarchical" * bool(hierarchical)}
    assert all(r["dispatch_us"] > 0 and r["base_combine_us"] > 0 and r["capacity"] >= 1 for r in rows)
    # Logical bandwidth: tokens x top-k x hidden x itemsize per rank.
    logical = 5 * 2 * 16 * getattr(torch, rows[1]["dtype"]).itemsize
    assert rows[1]["dispatch_gbs"] == pytest.approx(logical / rows[1]["dispatch_us"] / 1e3)
    assert (tmp_path / f"moe-w{world.world_size}.csv").read_text().count("\n") == 5
    assert (tmp_path / f"moe-w{world.world_size}.png").stat().st_size > 0
    assert capsys.readouterr().out.count(" ok") == 4


def test_remote_path_leaves_out_what_its_data_area_cannot_fetch_and_says_so(world, monkeypatch):
    """On the flat remote path, token counts whose combine rows (tokens x top-k x hidden) exceed the
    workspace's data area are left out of the run, named in the header, not failed."""
    monkeypatch.setattr(runtime, "transport", lambda: "rma")
    monkeypatch.setattr(moe.moe, "hierarchy", lambda: None)
    monkeypatch.setattr(moe.moe, "remote_room", lambda: 1 * 2 * 16 * 2)  # tiny at 1 token, not at 5
    header = {}
    rows = moe.run(TINY[:1], (1, 5), torch.bfloat16, 1, 2, header)
    assert [r.tokens for r in rows] == [1] and all(r.correct and r.path == "rma" for r in rows)
    assert header["left_out"].startswith("tiny x 5 tokens: more tokens than the workspace's data area holds")
