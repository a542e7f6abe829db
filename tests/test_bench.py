"""The benchmark harness: every op's rows are produced, checked and written (on the active backend)."""

import argparse
import json

import pytest

import symcomm
from symcomm import runtime
from symcomm.bench import __main__ as bench
from symcomm.bench import harness


@pytest.mark.dist
@pytest.mark.parametrize("name", list(bench.BENCHES))
def test_every_benchmark_runs_and_checks_its_output(world, name, tmp_path):
    args = argparse.Namespace(dtype="float32", min_bytes=64, max_bytes=4096, factor=8, warmup=1, iters=2,
                              symmetric=False, algorithms=True)
    header = harness.environment()
    rows = bench.run(name, bench.BENCHES[name], args, header)
    # Three sizes; on the nvshmem backend all-reduce has a row per algorithm too (auto, one_shot, two_shot),
    # except on the remote path, which has no algorithm to choose.
    rma = symcomm.transport() == "rma"
    n = 3 * (3 if name == "all-reduce" and world.backend == "nvshmem" and not rma else 1)
    assert [r.count for r in rows] == sorted(r.count for r in rows) and len(rows) == n
    assert all(r.correct and r.time_us > 0 and r.baseline_us > 0 for r in rows)
    assert {r.transport for r in rows} == {symcomm.transport() or "torch.distributed"}
    if name == "all-reduce" and rma and world.world_size > 1:
        assert {r.algorithm for r in rows} == {"auto/hierarchical" if runtime.node_layout() else "auto/one_shot"}
    for r in rows:
        # Each side's bandwidth from its own time: a baseline twice as slow has half the bandwidth.
        assert r.baseline_busbw_gbs * r.baseline_us == pytest.approx(r.busbw_gbs * min(r.time_us, r.graph_us or r.time_us))
    # The plot draws exactly the table's columns.
    drawn = harness.series(rows, header, "baseline")
    for label, xs, ys in drawn[:-1]:
        algorithm = label.rsplit(", ", 1)[1][:-1]
        assert (xs, ys) == ([r.bytes for r in rows if r.algorithm == algorithm],
                            [r.busbw_gbs for r in rows if r.algorithm == algorithm])
    assert drawn[-1][1:] == (list(dict.fromkeys(r.bytes for r in rows)),
                             list(dict((r.bytes, r.baseline_busbw_gbs) for r in rows).values()))
    if world.rank == 0:
        json_path, csv_path, png_path = harness.write(tmp_path, name, rows, header, "baseline")
        assert len(json.loads(json_path.read_text())["rows"]) == n
        assert png_path.stat().st_size > 0 and csv_path.read_text().count("\n") == n + 1


def test_parse_bytes():
    assert harness.parse_bytes("64K") == 65536 and harness.parse_bytes("1.5M") == 3 << 19
    assert harness.parse_bytes("1024") == 1024 and harness.parse_bytes("2gb") == 2 << 30
    with pytest.raises(ValueError, match="not a size"):
        harness.parse_bytes("lots")


def test_measured_cut_is_the_largest_size_where_one_shot_wins():
    def row(algorithm, nbytes, t):
        return harness.Row("all-reduce", algorithm, "p2p", nbytes, 1, "bfloat16", t, t, 1, 1, 1, 1, 1, None, True)

    rows = [row("one_shot", 1024, 5), row("two_shot", 1024, 9), row("one_shot", 4096, 8), row("two_shot", 4096, 8),
            row("one_shot", 16384, 20), row("two_shot", 16384, 12), row("auto/one_shot", 65536, 1)]
    assert bench.measured_cut(rows) == 4096
