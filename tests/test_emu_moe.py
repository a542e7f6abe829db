"""MoE dispatch and combine (csrc/moe/) and their C++ entry points on the emulated device: counts,
slots in (expert, source PE, token) order, routing codes, the weighted pull-back, and overflow; on
every path: loads and stores, the remote path (puts and gets only, every PE on a node of its own, so
that no load or store could reach a peer), and the hierarchical remote path (nodes of several PEs:
a token crosses to each node once, and load/store moves it inside the node)."""

from __future__ import annotations

import numpy as np
import pytest

import emu_harness as H

pytestmark = pytest.mark.emu


def node_positions(ids: np.ndarray, local: int, per_node: int, nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """What python/symcomm/moe.py computes for the hierarchical path: each token's index among this PE's
    tokens with an expert on node n (-1: none), and their number per node."""
    pos = np.full((ids.shape[0], nodes), -1, dtype=np.int32)
    seen = np.zeros(nodes, dtype=np.int32)
    for t in range(ids.shape[0]):
        for n in sorted(set((ids[t] // local // per_node).tolist())):
            pos[t, n] = seen[n]
            seen[n] += 1
    return pos, seen


def positions_and_counts(ids: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """What python/symcomm/moe.py computes on the device: pairs per expert, and each pair's index among
    this PE's pairs to its expert, in token order."""
    counts = np.bincount(ids, minlength=num_experts).astype(np.int32)
    positions = np.zeros(ids.size, dtype=np.int32)
    seen = np.zeros(num_experts, dtype=np.int64)
    for p, e in enumerate(ids):
        positions[p] = seen[e]
        seen[e] += 1
    return counts, positions


class Moe:
    """One dispatch/combine setup on every PE: tokens, ids and weights per PE; expert_x symmetric."""

    def __init__(self, w: H.World, rng, tokens: list[int], top_k: int, local: int, hidden: int, dtype: str,
                 capacity: int | None = None, ids: list[np.ndarray] | None = None, rma: bool = False,
                 per_node: int = 0):
        self.w, self.top_k, self.local, self.hidden, self.dtype = w, top_k, local, hidden, dtype
        self.rma, self.per_node = rma or per_node > 0, per_node
        self.npes = w.npes
        self.experts = local * self.npes
        self.tokens = tokens
        self.ids = ids or [rng.integers(0, self.experts, size=(t, top_k)) for t in tokens]
        per_expert = np.bincount(np.concatenate([i.ravel() for i in self.ids] + [np.zeros(0, int)]),
                                 minlength=self.experts)
        self.capacity = capacity if capacity is not None else max(1, int(per_expert.max(initial=0)))
        self.isz = H.ITEMSIZE[dtype]
        self.row_bytes = hidden * self.isz
        self.x = [H.exact_values(rng, (t, hidden)) for t in tokens]
        self.weights = [H.exact_values(rng, (t, top_k), span=4) for t in tokens]
        self.expert_x = w.alloc(local * self.capacity * self.row_bytes)
        # The flat remote path puts rows from x: symmetric, as its caller (python/symcomm/moe.py) makes it.
        x_sym = w.alloc(max(tokens, default=1) * self.row_bytes) if rma and not per_node else None
        self.host = []
        for pe in range(self.npes):
            buffers = {}
            for name, values in [("x", H.encode(self.x[pe], dtype)), ("ids", self.ids[pe].astype(np.int64)),
                                 ("weights", self.weights[pe].astype(np.float32))]:
                addr, raw = w.private(max(values.nbytes, 16))
                raw[:values.nbytes] = values.view(np.uint8).ravel()
                buffers[name] = addr
            if x_sym is not None:
                raw = w.view(pe, x_sym, np.uint8, tokens[pe] * self.row_bytes)
                raw[:] = H.encode(self.x[pe], dtype).view(np.uint8).ravel()
                buffers["x"] = w.base(pe) + x_sym
            counts, positions = positions_and_counts(self.ids[pe].ravel(), self.experts)
            node_pos, node_tokens = node_positions(self.ids[pe], local, per_node or self.npes, self.npes // (per_node or self.npes))
            for name, values in [("counts", counts), ("positions", positions), ("node_pos", node_pos),
                                 ("node_tokens", node_tokens)]:
                addr, raw = w.private(max(values.nbytes, 16))
                raw[:values.nbytes] = values.view(np.uint8).ravel()
                buffers[name] = addr
            buffers["expert_counts"], raw = w.private(4 * local)
            raw.view(np.int32)[:] = -1
            buffers["routing"], raw = w.private(max(8 * tokens[pe] * top_k, 16))
            raw.view(np.int64)[:] = -1
            buffers["y"], raw = w.private(max(tokens[pe] * self.row_bytes, 16))
            H.poison(raw.view(H.storage(dtype)), dtype)
            buffers["y_raw"] = raw
            H.poison(w.view(pe, self.expert_x, H.storage(dtype), local * self.capacity * hidden), dtype)
            self.host.append(buffers)

    def grid_bytes(self, rows_per_token: int) -> int:
        return self.capacity // self.npes * rows_per_token * self.row_bytes

    def hierarchy(self, pe: int) -> tuple:
        """The kernels' trailing arguments: per_node, node_pos, node_tokens, data_bytes."""
        b = self.host[pe]
        return self.per_node, b["node_pos"], b["node_tokens"], self.w.workspace_bytes - self.w.data_offset()

    def dispatch(self, pe: int) -> None:
        b = self.host[pe]
        self.w.on_pe(pe)
        self.w.ext.moe_dispatch(self.w.base(pe), b["x"], b["ids"], b["positions"], b["counts"],
                                self.w.base(pe) + self.expert_x, b["expert_counts"], b["routing"], self.tokens[pe],
                                self.top_k, self.experts, self.capacity, self.hidden, H.DTYPE_CODES[self.dtype],
                                self.grid_bytes(self.top_k), 0, self.rma, *self.hierarchy(pe))

    def combine(self, pe: int, expert_y: int) -> None:
        b = self.host[pe]
        self.w.on_pe(pe)
        self.w.ext.moe_combine(self.w.base(pe), self.w.base(pe) + expert_y, b["routing"], b["weights"], b["y"],
                               self.tokens[pe], self.top_k, self.experts, self.capacity, self.hidden,
                               H.DTYPE_CODES[self.dtype], self.grid_bytes(1), 0, self.rma, *self.hierarchy(pe))

    def expected_slots(self):
        """{expert: [(source PE, token, j), ...]} in slot order, and each pair's routing code."""
        slots = {e: [] for e in range(self.experts)}
        routing = []
        for src in range(self.npes):
            codes = np.zeros((self.tokens[src], self.top_k), dtype=np.int64)
            for t in range(self.tokens[src]):
                for j in range(self.top_k):
                    e = int(self.ids[src][t, j])
                    codes[t, j] = e * self.capacity + len(slots[e])
                    slots[e].append((src, t, j))
            routing.append(codes)
        return slots, routing

    def check_dispatch(self) -> None:
        w, slots, routing = self.w, *self.expected_slots()
        for pe in range(self.npes):
            b = self.host[pe]
            got_routing = H.at(b["routing"], np.int64, self.tokens[pe] * self.top_k)
            np.testing.assert_array_equal(got_routing.reshape(routing[pe].shape), routing[pe], err_msg=f"routing, PE {pe}")
            counts = H.at(b["expert_counts"], np.int32, self.local)
            buf = w.view(pe, self.expert_x, H.storage(self.dtype), self.local * self.capacity * self.hidden)
            buf = buf.reshape(self.local, self.capacity, self.hidden)
            for el in range(self.local):
                e = pe * self.local + el
                assert counts[el] == len(slots[e]), f"expert {e}: count {counts[el]}, expected {len(slots[e])}"
                for slot, (src, t, _) in enumerate(slots[e]):
                    np.testing.assert_array_equal(H.decode(buf[el, slot], self.dtype), self.x[src][t],
                                                  err_msg=f"expert {e}, slot {slot}")
                # Slots past the count are left as they were.
                assert np.isnan(H.decode(buf[el, len(slots[e]):], self.dtype)).all()

    def check_combine(self, expert_scale: np.ndarray) -> None:
        for pe in range(self.npes):
            want = np.zeros((self.tokens[pe], self.hidden))
            for t in range(self.tokens[pe]):
                for j in range(self.top_k):
                    want[t] += self.weights[pe][t, j] * expert_scale[self.ids[pe][t, j]] * self.x[pe][t]
            got = H.decode(self.host[pe]["y_raw"].view(H.storage(self.dtype))[:self.tokens[pe] * self.hidden],
                           self.dtype)
            # The float32 sum is exact for these values; the kernel rounds it once to the dtype.
            want = H.decode(H.encode(want, self.dtype), self.dtype)
            np.testing.assert_array_equal(got.reshape(want.shape), want, err_msg=f"y, PE {pe}")


def run_layer(m: Moe, expert_scale: np.ndarray) -> None:
    """Dispatch, the experts (expert e scales its rows by expert_scale[e], into a second buffer), combine."""
    w = m.w
    for pe in range(m.npes):
        m.dispatch(pe)
    w.check()
    m.check_dispatch()
    expert_y = w.alloc(m.local * m.capacity * m.row_bytes)
    for pe in range(m.npes):
        n = m.local * m.capacity * m.hidden
        xs = H.decode(w.view(pe, m.expert_x, H.storage(m.dtype), n), m.dtype).reshape(m.local, m.capacity, m.hidden)
        ys = xs * expert_scale[pe * m.local:(pe + 1) * m.local, None, None]
        w.view(pe, expert_y, H.storage(m.dtype), n)[:] = H.encode(np.nan_to_num(ys).ravel(), m.dtype)
    for pe in range(m.npes):
        m.combine(pe, expert_y)
    w.check()
    m.check_combine(expert_scale)


CASES = {
    # name: (tokens per PE (by npes), top_k, local experts)
    "uneven": (lambda n: ([5, 0, 9, 1] * 2)[:n], 2, 2),
    "one_token": (lambda n: [1] * n, 1, 1),
    "many": (lambda n: [40 + 3 * q for q in range(n)], 4, 3),
}


PATHS = pytest.mark.parametrize("path", ["p2p", "rma", "hierarchical"])


def layout(path: str, npes: int) -> tuple[int, dict]:
    """PEs and pes_per_node for H.world, and Moe's path arguments: on the remote path every PE on a node
    of its own; the hierarchical one takes one more PE than `npes` where that is odd, on nodes of 2."""
    if path == "hierarchical":
        return npes + npes % 2, {"per_node": 2}
    return npes, {"rma": path == "rma"}


def world_nodes(moe_path: dict) -> int:
    return moe_path.get("per_node") or (1 if moe_path.get("rma") else 0)


@pytest.mark.parametrize("rma", [False, True], ids=["p2p", "rma"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("npes", [2, 3] if H.TSAN else [1, 2, 3, 4])
def test_dispatch_combine(npes, case, dtype, rma):
    tokens, top_k, local = CASES[case]
    rng = np.random.default_rng([npes, len(case), len(dtype)])
    with H.world(npes, pes_per_node=1 if rma else 0) as w:
        m = Moe(w, rng, tokens(npes), top_k, local, hidden=24, dtype=dtype, rma=rma)
        run_layer(m, H.exact_values(rng, m.experts, span=3))


# (nodes, PEs per node) of the hierarchical path's cases.
NODE_LAYOUTS = [(2, 2)] if H.TSAN else [(2, 2), (2, 3), (3, 2), (2, 4)]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("nodes", NODE_LAYOUTS, ids=lambda n: f"{n[0]}x{n[1]}")
def test_hierarchical(nodes, case, dtype):
    """Tokens cross to each node once, then fan out inside it; combine sums per node first."""
    tokens, top_k, local = CASES[case]
    npes = nodes[0] * nodes[1]
    rng = np.random.default_rng([npes, nodes[1], len(case), len(dtype)])
    with H.world(npes, pes_per_node=nodes[1]) as w:
        m = Moe(w, rng, tokens(npes), top_k, local, hidden=24, dtype=dtype, per_node=nodes[1])
        run_layer(m, H.exact_values(rng, m.experts, span=3))


@pytest.mark.skipif(H.TSAN, reason=H.MOST_PES_UNDER_TSAN)
@pytest.mark.parametrize("nodes,per_node", [(16, 8), (H.MOST_PES, 1)], ids=["16x8", f"{H.MOST_PES}x1"])
def test_at_the_pe_limit(nodes, per_node):
    """128 PEs, one block each: every sender's counts per expert and tokens per node, and its barrier
    flags, have places of their own on every PE."""
    npes = nodes * per_node
    rng = np.random.default_rng([nodes, per_node])
    path = {"per_node": per_node} if per_node > 1 else {"rma": True}
    with H.world(npes, pes_per_node=per_node, blocks=1, threads=32) as w:
        m = Moe(w, rng, [int(t) for t in rng.integers(0, 4, npes)], 2, 1, hidden=8, dtype="bfloat16", **path)
        run_layer(m, H.exact_values(rng, m.experts, span=3))


def test_more_pes_than_the_limit_are_refused():
    rng = np.random.default_rng(6)
    with H.world(H.MOST_PES + 1, pes_per_node=1, blocks=1) as w:
        m = Moe(w, rng, [1] * w.npes, 1, 1, hidden=8, dtype="float16", rma=True)
        with pytest.raises(RuntimeError, match=f"at most {H.MOST_PES} PEs are supported"):
            m.dispatch(0)


def test_warp_wide_work_in_partial_warps_fails_naming_it():
    """A threads cap below a warp (emu.configure) would leave lanes of a warp-wide put out, and the
    kernels that count their warps would find none: the emulation fails instead of copying part of a
    row or spinning."""
    rng = np.random.default_rng(7)
    with H.world(4, pes_per_node=2, threads=8, timeout_s=1.0) as w:
        m = Moe(w, rng, [2, 1, 3, 1], 1, 1, hidden=8, dtype="float16", per_node=2)
        for pe in range(4):
            m.dispatch(pe)
        errors = w.synchronize()
        assert any("__syncwarp in a block of 8 threads: warp-wide calls need whole warps" in e
                   for e in errors.values()), errors


def test_hierarchical_data_area_bound():
    """More tokens than the data area's records hold: refused before any kernel runs."""
    rng = np.random.default_rng(8)
    with H.world(4, pes_per_node=2) as w:
        m = Moe(w, rng, [3, 2, 1, 1], 1, 1, hidden=8, dtype="float16", per_node=2)
        held = w.ext.moe_slots(w.workspace_bytes - w.data_offset(), 2, 1, m.row_bytes, False)
        m.tokens = [held + 1] * 4
        with pytest.raises(RuntimeError, match="SYMCOMM_WORKSPACE_BYTES"):
            m.dispatch(0)


def test_remote_path_refuses_a_private_x():
    """NVSHMEM's network transports send only from symmetric (or registered) memory: the emulation
    fails loudly where a put's source is not on the heap."""
    rng = np.random.default_rng(4)
    with H.world(2, pes_per_node=1, timeout_s=1.0) as w:
        m = Moe(w, rng, [3, 2], 1, 1, hidden=8, dtype="float16")
        m.rma = True
        errors = {}
        for pe in range(2):
            try:
                m.dispatch(pe)
            except RuntimeError as e:
                errors[pe] = str(e)
        errors = {**w.synchronize(), **errors}
        assert any("nvshmemx_putmem_nbi_warp (source)" in e and "is not in PE" in e for e in errors.values()), errors


def test_dispatch_float32():
    rng = np.random.default_rng(3)
    with H.world(3) as w:
        m = Moe(w, rng, [4, 7, 2], 2, 2, hidden=12, dtype="float32")
        for pe in range(3):
            m.dispatch(pe)
        w.check()
        m.check_dispatch()


@PATHS
def test_duplicates_and_one_owner(path):
    """Tokens that name one expert twice (each pair its own slot, both outputs added), and every pair
    routed to PE 0's experts, with the capacity exactly full."""
    (npes, moe_path), top_k, local = layout(path, 3), 3, 2
    rng = np.random.default_rng(11)
    tokens = [6, 4, 5, 2][:npes]
    ids = [rng.integers(0, local, size=(t, top_k)) for t in tokens]
    ids[1][:, 1] = ids[1][:, 0]
    with H.world(npes, pes_per_node=world_nodes(moe_path)) as w:
        m = Moe(w, rng, tokens, top_k, local, hidden=16, dtype="bfloat16", ids=ids, **moe_path)
        assert m.capacity == max(np.bincount(np.concatenate([i.ravel() for i in ids])))
        run_layer(m, H.exact_values(rng, m.experts, span=3))


@PATHS
@pytest.mark.parametrize("chaos", [0.0, 0.05], ids=["plain", "chaos"])
def test_back_to_back_rounds(chaos, path):
    """Dispatch and combine, again and again, with no host synchronisation: the experts are the
    identity (combine reads expert_x), and the next dispatch may overwrite expert_x only once every PE's
    combine has read it."""
    (npes, moe_path), rounds = layout(path, 3), 3
    rng = np.random.default_rng(5)
    with H.world(npes, blocks=2, chaos_seed=9, chaos_rate=chaos, pes_per_node=world_nodes(moe_path)) as w:
        layers = []
        expert_x = None
        for _ in range(rounds):
            m = Moe(w, rng, [7, 3, 0, 4][:npes], 2, 2, hidden=16, dtype="float16", capacity=16, **moe_path)
            if expert_x is None:
                expert_x = m.expert_x
            m.expert_x = expert_x  # every round reuses one expert buffer
            layers.append(m)
            for pe in range(npes):
                m.dispatch(pe)
                m.combine(pe, expert_x)
        w.check()
        for m in layers:
            m.check_combine(np.ones(m.experts))


def test_overflow_traps_naming_pe_and_expert():
    npes = 2
    rng = np.random.default_rng(2)
    ids = [np.array([[1], [1], [1]]), np.array([[0], [1]])]
    with H.world(npes, timeout_s=1.0) as w:
        m = Moe(w, rng, [3, 2], 1, 1, hidden=8, dtype="float16", capacity=3, ids=ids)
        errors = {}
        for pe in range(npes):
            try:
                m.dispatch(pe)
            except RuntimeError as e:
                errors[pe] = str(e)
        errors = {**w.synchronize(), **errors}
        # PE 1's pair to expert 1 comes after PE 0's three: slot 3 of a capacity of 3.
        assert "PE 1: moe_dispatch overflows expert 1: slot 3 >= capacity 3" in errors[1]
