"""The multi-node cost model (symcomm.bench.cost): the README shows its very table, and the model's
arithmetic holds where it can be checked by hand."""

from pathlib import Path

import pytest

from symcomm.bench import cost

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_shows_the_models_table():
    assert cost.table() in README.read_text(), "README's cost table is stale: paste `python3 -m symcomm.bench.cost`"


@pytest.mark.parametrize("nodes", cost.NODES)
def test_hierarchical_beats_flat_across_nodes(nodes):
    for tokens in cost.SIZES.values():
        e = cost.all_reduce(tokens * cost.HIDDEN * 2, nodes)
        assert e.hierarchical_s < e.flat_s
        for combine in (False, True):
            m = cost.moe(tokens, nodes, combine)
            assert m.hierarchical_s < m.flat_s
            # As built, the steps add up rather than overlap, over more bytes: never better.
            assert m.built_s > m.hierarchical_s


def test_the_terms_by_hand():
    # 2 nodes: a token's 8 experts miss the other node with probability 2**-8.
    assert cost.remote_nodes_per_token(2) == pytest.approx(1 - 2**-8)
    assert cost.remote_nodes_per_token(16) == cost.MAX_NODES  # node-limited routing caps it
    # A large all-reduce on 2 nodes is NVLink-bound: 2 * 7/8 * S / B_NVL, plus the step latencies.
    s = 8 * 2**30
    assert cost.all_reduce(s, 2).hierarchical_s == pytest.approx(2 * 7 / 8 * s / cost.B_NVL + 2 * cost.A_NVL
                                                                + 2 * cost.A_NET)
    # As built: both node steps, then this GPU's 1/8 pushed to the one other node, and six barriered steps.
    assert cost.all_reduce(s, 2).built_s == pytest.approx(2 * 7 / 8 * s / cost.B_NVL + s / 8 / cost.B_NIC
                                                         + 4 * cost.A_NVL + 2 * cost.A_NET)
    # Dispatch as built on 2 nodes: a record of 64 bytes of codes and a bf16 row per token crossing.
    t, row = 128, cost.HIDDEN * 2
    crossing = t * (1 - 2**-8)
    assert cost.moe(t, 2, combine=False).built_s == pytest.approx(
        crossing * (64 + row) / cost.B_NIC + t * 8 * 7 / 8 * row / cost.B_NVL + 4 * cost.A_NET)
