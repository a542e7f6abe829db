"""The host side of the nvshmem MoE dispatch (python/symcomm/moe.py), on CPU."""

import pytest
import torch

from symcomm import moe


@pytest.mark.parametrize("pairs, experts", [(0, 4), (1, 4), (37, 5), (500, 64)])
def test_pair_positions_count_and_order_pairs_per_expert(pairs, experts):
    g = torch.Generator().manual_seed(pairs * 7 + experts)
    ids = torch.randint(0, experts, (pairs,), generator=g)
    counts, positions = moe.pair_positions(ids, experts)
    seen = [0] * experts
    for i, e in enumerate(ids.tolist()):
        assert positions[i] == seen[e], f"pair {i} to expert {e}"
        seen[e] += 1
    assert counts.tolist() == seen and counts.dtype == positions.dtype == torch.int32
