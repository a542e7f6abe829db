"""The tp-layer benchmark on the backend the session runs: every row timed, checked and written."""

import json

import pytest
import torch

from symcomm.bench import harness, tp_layer
from symcomm.nn import LlamaConfig

pytestmark = pytest.mark.dist

# num_kv_heads=2 < 4 ranks: at world 4 each kv head is replicated on two ranks.
CONFIG = LlamaConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2)
SHAPES = (tp_layer.Shape("decode", 4), tp_layer.Shape("prefill", 8))


def test_rows_are_timed_checked_and_written(world, tmp_path):
    rows = tp_layer.run(CONFIG, tp_layer.layer_weights(CONFIG, torch.float32), SHAPES, warmup=1, iters=2)
    assert [(r.shape, r.sequence_parallel) for r in rows] == [
        ("decode", False), ("decode", True), ("prefill", False), ("prefill", True)]
    assert all(r.correct and r.max_abs_diff < 1e-4 for r in rows)
    assert all(r.tp == world.world_size and r.backend == world.backend for r in rows)
    assert all(r.time_us > 0 and r.tp1_us > 0 and r.speedup == pytest.approx(r.tp1_us / r.time_us) for r in rows)
    if world.rank == 0:
        json_path, csv_path = harness.write_rows(tmp_path, "tp-layer", rows, {"backend": world.backend})
        assert len(json.loads(json_path.read_text())["rows"]) == 4
        assert csv_path.read_text().count("\n") == 5
        assert tp_layer.table(rows).count(" ok") == 4


def test_tokens_not_divisible_by_the_world_are_refused(world):
    if world.world_size == 1:
        pytest.skip("every token count divides a world of one")
    odd = (tp_layer.Shape("odd", world.world_size + 1),)
    with pytest.raises(ValueError, match=f"not divisible by the tensor-parallel size {world.world_size}"):
        tp_layer.run(CONFIG, tp_layer.layer_weights(CONFIG, torch.float32), odd, warmup=1, iters=1)
