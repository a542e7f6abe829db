"""The collective kernels (csrc/collectives/) and their C++ entry points, run on the emulated device with
1 to 4 PEs in this process: every kernel, dtype and branch, PEs that place their inputs differently,
back-to-back sequences, and a PE that never arrives; the remote path's kernels (push_*) also with
the PEs on emulated nodes that load/store cannot reach across."""

from __future__ import annotations

import numpy as np
import pytest

import emu_harness as H

pytestmark = pytest.mark.emu

DTYPES = list(H.DTYPE_CODES)
PES = [2, 3] if H.TSAN else [1, 2, 3, 4]
BLOCK_BYTES = 512 * 16 * 4  # what grid_for gives one block


def lengths(dtype: str) -> dict[str, int]:
    """Row lengths (elements) for each branch of the kernels: one element; vectors then a scalar tail;
    several blocks whose last one takes the remainder (the block cap is 4)."""
    isz = H.ITEMSIZE[dtype]
    n = 16 // isz
    return {"one": 1, "tail": 5 * n + n - 1, "blocks": (3 * BLOCK_BYTES + 7 * 16) // isz + 3}


class Inputs:
    """Each PE's input rows ([rows, width] of `dtype`), put where `placement[pe]` says:

    - "symmetric": in a symmetric buffer, read in place; rows `pitch` bytes apart (padded, and when vec16
      is off, not on a 16-byte boundary);
    - "staged": compact rows in the workspace's staging area, as collectives.py copies a private input.

    So PEs tell each other different offsets and pitches. Values are copied there on each PE's stream,
    in order with its kernels, as collectives.py does."""

    def __init__(self, w: H.World, rows: int, width: int, dtype: str, vec16: bool, placement: list[str]):
        isz = H.ITEMSIZE[dtype]
        self.rows, self.width, self.dtype = rows, width, dtype
        padded = (width * isz + 31) // 16 * 16 if vec16 else width * isz + 2 * isz
        self.sym_pitch = padded if rows > 1 else 0
        self.sym_offset = w.alloc(rows * padded + 16) + (0 if vec16 else isz)
        self.placement = placement
        self.w = w
        self.vec16 = vec16

    def place(self, pe: int, values: np.ndarray, stream: int = 0) -> tuple[int, int]:
        """Queues the copy of PE pe's values ([rows, width] float64) to where its kernel reads them:
        (address, pitch)."""
        w, isz = self.w, H.ITEMSIZE[self.dtype]
        raw = H.encode(values, self.dtype)
        if self.placement[pe] == "staged":
            addr, pitch = w.base(pe) + w.data_offset(), self.width * isz if self.rows > 1 else 0
            if self.vec16 and pitch % 16:
                raise ValueError("a staged input with vec16 needs rows of 16-byte multiples")
        else:
            addr, pitch = w.base(pe) + self.sym_offset, self.sym_pitch
        host_addr, host = w.private(raw.nbytes)
        host[:] = raw.view(np.uint8).ravel()
        row_bytes = raw.nbytes // self.rows
        w.on_pe(pe)
        for r in range(self.rows):
            w.ext.emu.memcpy_async(addr + r * pitch, host_addr + r * row_bytes, row_bytes, stream)
        return addr, pitch


def output(w: H.World, nbytes: int, dtype: str) -> tuple[int, np.ndarray]:
    addr, raw = w.private(nbytes)
    view = raw.view(H.storage(dtype)) if dtype != "bytes" else raw
    H.poison(view, dtype)
    return addr, view


def call(w: H.World, kernel: str, pe: int, src, row: int, length_bytes: int, dst: int, dst_pitch: int, dtype: str,
         vec16: bool, result_offset: int = 0, stream: int = 0, team: tuple[int, int, int] = (0, 1, 0)) -> None:
    """One PE's call of a kernel's entry point; the push kernels also take their team (first, stride, size)."""
    w.on_pe(pe)
    getattr(w.ext, kernel)(w.base(pe), src[0], src[1], row, length_bytes, dst, dst_pitch, result_offset,
                           H.DTYPE_CODES.get(dtype, 0), vec16, stream, *(team if kernel.startswith("push") else ()))


def placements(rng, npes: int, allow_staged: bool = True) -> list[str]:
    options = ["symmetric", "staged"] if allow_staged else ["symmetric"]
    p = [options[rng.integers(len(options))] for _ in range(npes)]
    if allow_staged and npes > 1:
        p[0], p[-1] = "symmetric", "staged"
    return p


def random_inputs(w: H.World, rng, rows: int, width: int, dtype: str, vec16: bool) -> tuple[Inputs, list]:
    """Every PE's exact random values, placed in place or staged (where vec16 lets rows be staged)."""
    staged_ok = not vec16 or rows == 1 or width * H.ITEMSIZE[dtype] % 16 == 0
    inputs = Inputs(w, rows, width, dtype, vec16, placements(rng, w.npes, allow_staged=staged_ok))
    return inputs, [H.exact_values(rng, (rows, width)) for _ in range(w.npes)]


def result_area(w: H.World) -> int:
    """Two-shot's result area: after the staging area's first 1 MiB."""
    return w.data_offset() + (1 << 20)


@pytest.mark.parametrize("vec16", [True, False], ids=["vec16", "scalar"])
@pytest.mark.parametrize("size", ["one", "tail", "blocks"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("npes", PES)
@pytest.mark.parametrize("kernel", ["all_reduce", "reduce_scatter", "two_shot"])
def test_reductions(kernel, npes, dtype, size, vec16):
    rng = np.random.default_rng([npes, DTYPES.index(dtype), len(size), vec16, len(kernel)])
    width = lengths(dtype)[size]
    rows = npes if kernel == "reduce_scatter" else 1
    isz = H.ITEMSIZE[dtype]
    with H.world(npes) as w:
        inputs, values = random_inputs(w, rng, rows, width, dtype, vec16)
        outs = []
        for pe in range(npes):
            src = inputs.place(pe, values[pe])
            dst, out = output(w, width * isz, dtype)
            outs.append(out)
            if kernel == "two_shot":
                call(w, "two_shot_all_reduce", pe, src, 0, width * isz, dst, 0, dtype, vec16, result_area(w))
            else:
                call(w, "reduce", pe, src, pe if kernel == "reduce_scatter" else 0, width * isz, dst, 0, dtype, vec16)
        w.check()
        for pe in range(npes):
            row = pe if kernel == "reduce_scatter" else 0
            expected = sum(v[row] for v in values)
            np.testing.assert_array_equal(H.decode(outs[pe], dtype), expected, err_msg=f"PE {pe}")


def inbox_area(w: H.World) -> int:
    """The push kernels' inbox: after the staging area and two-shot's result area."""
    return w.data_offset() + (2 << 20)


# (PEs, PEs per node): one node; 2 nodes x 2 PEs; 3 nodes x 1 PE; 2 nodes of 2 and 1 PEs.
LAYOUTS = [(1, 0), (2, 0), (3, 0), (4, 0), (4, 2), (3, 1), (3, 2), (2, 1)]


# The reductions in both widths; a gather copies in the units its addresses allow, and vec16 is only
# what collectives.py passes for it (from the output's row pitch).
PUSHES = [("all_reduce", True), ("all_reduce", False), ("reduce_scatter", True), ("reduce_scatter", False),
          ("all_gather", None), ("all_to_all", None)]
PUSH_IDS = [f"{k}-{ {True: 'vec16', False: 'scalar'}.get(v, 'copy')}" for k, v in PUSHES]


# Under ThreadSanitizer (orderings, not arithmetic): one dtype, the sizes with several blocks and a tail.
@pytest.mark.parametrize("size", ["tail", "blocks"] if H.TSAN else ["one", "tail", "blocks"])
@pytest.mark.parametrize("dtype", ["float32"] if H.TSAN else DTYPES)
@pytest.mark.parametrize("npes,pes_per_node", [lay for lay in LAYOUTS if not H.TSAN or lay[0] < 4],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("kernel,vec16", PUSHES, ids=PUSH_IDS)
def test_remote_path(kernel, vec16, npes, pes_per_node, dtype, size):
    """push_reduce and push_gather: every PE's rows reach the others only by puts with signal, across
    emulated nodes too (where a peer pointer is null, so a kernel that used one would fail)."""
    run_push(kernel, vec16, npes, pes_per_node, dtype, size)


@pytest.mark.parametrize("npes,pes_per_node", [(12, 4)] if H.TSAN else [(12, 4), (10, 1)], ids=lambda v: str(v))
@pytest.mark.parametrize("kernel,vec16", PUSHES[::2] if H.TSAN else PUSHES, ids=PUSH_IDS[::2] if H.TSAN else PUSH_IDS)
def test_remote_path_beyond_what_load_store_kernels_read(kernel, vec16, npes, pes_per_node):
    """More PEs than a load/store kernel reads (8): the push kernels sum in passes of 8 rows, the
    partial sum carried in the output, and the barriers take turns where a team outnumbers a block's
    threads (8 here)."""
    run_push(kernel, vec16, npes, pes_per_node, "float32", "blocks", workspace_bytes=8 << 20, heap_bytes=16 << 20,
             threads=8)


@pytest.mark.skipif(H.TSAN, reason=H.MOST_PES_UNDER_TSAN)
@pytest.mark.parametrize("pes_per_node", [8, 1])
@pytest.mark.parametrize("kernel,vec16", PUSHES, ids=PUSH_IDS)
def test_remote_path_at_the_pe_limit(kernel, vec16, pes_per_node):
    """128 PEs, one block each: every PE's barrier flag has a slot of its own on every peer, and the
    barriers take turns over a team four times the block's threads."""
    run_push(kernel, vec16, H.MOST_PES, pes_per_node, "float32", "tail", blocks=1, threads=32)


@pytest.mark.parametrize("kernel", ["push_reduce", "push_gather"])
def test_remote_path_refuses_more_pes_than_the_limit(kernel):
    with H.world(H.MOST_PES + 1, pes_per_node=1, blocks=1) as w:
        dst, _ = output(w, (H.MOST_PES + 1) * 16, "float32")
        src = (w.base(0) + w.alloc(16), 0)
        with pytest.raises(RuntimeError, match=f"at most {H.MOST_PES} PEs are supported, got {H.MOST_PES + 1}"):
            call(w, kernel, 0, src, 0, 16, dst, 16 if kernel == "push_gather" else 0, "float32", True, inbox_area(w))


def run_push(kernel, vec16, npes, pes_per_node, dtype, size, **world) -> dict:
    """Runs the push kernel on every PE and checks its results; returns what the emulated network landed."""
    rng = np.random.default_rng([npes, pes_per_node, DTYPES.index(dtype), len(size), bool(vec16), len(kernel)])
    width = lengths(dtype)[size]
    rows = npes if kernel in ("reduce_scatter", "all_to_all") else 1
    gathers = kernel in ("all_gather", "all_to_all")
    isz = H.ITEMSIZE[dtype]
    if gathers:
        vec16 = width * isz % 16 == 0
    with H.world(npes, pes_per_node=pes_per_node, **world) as w:
        inputs, values = random_inputs(w, rng, rows, width, dtype, vec16)
        outs = []
        for pe in range(npes):
            src = inputs.place(pe, values[pe])
            dst, out = output(w, (npes if gathers else 1) * width * isz, dtype)
            outs.append(out)
            call(w, "push_gather" if gathers else "push_reduce", pe, src, 0, width * isz, dst,
                 width * isz if gathers else 0, dtype, vec16, inbox_area(w))
        w.check()
        for pe in range(npes):
            row = pe if rows > 1 else 0
            got = H.decode(outs[pe], dtype)
            if gathers:
                np.testing.assert_array_equal(got.reshape(npes, width), np.stack([v[row] for v in values]),
                                              err_msg=f"PE {pe}")
            else:
                np.testing.assert_array_equal(got, sum(v[row] for v in values), err_msg=f"PE {pe}")
        return w.ext.emu.rma_stats()


def test_remote_path_lands_out_of_order_and_moves_each_byte_once():
    """The emulated network lands a PE's puts and signals in an order NVSHMEM allows, not in the order
    issued (so only the kernels' fences and consistency steps keep the results right), and moves each
    PE's row to each team member once."""
    npes, width = 4, lengths("float32")["blocks"]
    stats = run_push("all_reduce", True, npes, 2, "float32", "blocks")
    assert stats["overtakes"] > 0, stats
    assert stats["bytes"] == npes * npes * width * 4, stats


@pytest.mark.parametrize("dtype", ["float32"] if H.TSAN else DTYPES)
@pytest.mark.parametrize("nodes,per_node", [(2, 2), (2, 3), (3, 2), (4, 2)] if not H.TSAN else [(2, 2)])
def test_hierarchical_all_reduce_by_teams(nodes, per_node, dtype):
    """The hierarchical all-reduce as collectives.py runs it, kernel by kernel: a reduce-scatter among
    each node's PEs, an all-reduce among one PE of every node (its rail), an all-gather inside the node;
    each kind of step with an inbox of its own, since a PE on another node may run a step ahead."""
    npes, isz = nodes * per_node, H.ITEMSIZE[dtype]
    rng = np.random.default_rng([nodes, per_node, DTYPES.index(dtype)])
    c = lengths(dtype)["tail"]
    values = [H.exact_values(rng, (per_node, c)) for _ in range(npes)]
    with H.world(npes, pes_per_node=per_node, workspace_bytes=6 << 20, heap_bytes=16 << 20) as w:
        node_inbox, rail_inbox = inbox_area(w), inbox_area(w) + (1 << 20)
        sym = w.alloc(3 * per_node * c * 8 + 256)
        part, summed = sym, sym + round_up(c * isz, 256)
        outs = []
        for pe in range(npes):
            w.view(pe, sym + 2 * round_up(c * isz, 256), H.storage(dtype), per_node * c)[:] = \
                H.encode(values[pe], dtype).ravel()
            node, rail = (pe // per_node * per_node, 1, per_node), (pe % per_node, per_node, nodes)
            src = (w.base(pe) + sym + 2 * round_up(c * isz, 256), c * isz)
            call(w, "push_reduce", pe, src, 0, c * isz, w.base(pe) + part, 0, dtype, False, node_inbox, team=node)
            call(w, "push_reduce", pe, (w.base(pe) + part, 0), 0, c * isz, w.base(pe) + summed, 0, dtype, False,
                 rail_inbox, team=rail)
            dst, out = output(w, per_node * c * isz, dtype)
            outs.append(out)
            call(w, "push_gather", pe, (w.base(pe) + summed, 0), 0, c * isz, dst, c * isz, dtype, False, node_inbox,
                 team=node)
        w.check()
        total = sum(values).ravel()
        for pe in range(npes):
            np.testing.assert_array_equal(H.decode(outs[pe], dtype), total, err_msg=f"PE {pe}")


def test_a_team_must_hold_the_calling_pe():
    with H.world(4) as w:
        w.on_pe(1)
        with pytest.raises(RuntimeError, match=r"team \(first 0, stride 2, size 2\) is not a set of PEs that holds PE 1"):
            call(w, "push_reduce", 1, (w.base(1) + w.data_offset(), 0), 0, 64, w.base(1) + w.data_offset(), 0,
                 "float32", False, inbox_area(w), team=(0, 2, 2))


@pytest.mark.parametrize("npes,pes_per_node", [(4, 2), (3, 1), (3, 0)])
def test_reachable_peers_follow_the_nodes(npes, pes_per_node):
    with H.world(npes, pes_per_node=pes_per_node) as w:
        per_node = pes_per_node or npes
        for pe in range(npes):
            w.on_pe(pe)
            assert w.ext.reachable_peers(w.base(pe)) == [q // per_node == pe // per_node for q in range(npes)]


def round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


@pytest.mark.parametrize("size", ["short", "blocks"])
@pytest.mark.parametrize("unit", [16, 8, 4, 2, 1])
@pytest.mark.parametrize("npes", PES)
@pytest.mark.parametrize("kernel", ["all_gather", "all_to_all"])
def test_gather(kernel, npes, unit, size):
    """Inputs and outputs aligned to `unit` bytes and no more, so the copy runs in units of `unit`; odd
    PEs stage their rows (256-byte aligned, compact), so peers read rows of different alignments."""
    rng = np.random.default_rng([npes, unit, len(kernel), len(size)])
    length = 37 if size == "short" else 3 * BLOCK_BYTES + 37
    misalign = unit % 16
    rows = npes if kernel == "all_to_all" else 1
    pitch = round_up(length, 32) + unit if rows > 1 else 0
    dst_pitch = round_up(length, 32) + unit
    with H.world(npes) as w:
        sym = w.alloc(rows * (length + 64) + 64) + misalign
        data = [rng.integers(0, 256, size=(rows, length), dtype=np.uint8) for _ in range(npes)]
        outs = []
        for pe in range(npes):
            staged = pe % 2 == 1
            offset, row_pitch = (w.data_offset(), length if rows > 1 else 0) if staged else (sym, pitch)
            for r in range(rows):
                w.view(pe, offset + r * row_pitch, np.uint8, length)[:] = data[pe][r]
            dst, out = w.private(npes * dst_pitch, misalign=misalign)
            out[:] = 0xFF
            outs.append(out)
            call(w, "gather", pe, (w.base(pe) + offset, row_pitch), pe if rows > 1 else 0, length, dst, dst_pitch,
                 "float32", False)
        w.check()
        for pe in range(npes):
            row = pe if rows > 1 else 0
            for q in range(npes):
                got = outs[pe][q * dst_pitch:q * dst_pitch + length]
                np.testing.assert_array_equal(got, data[q][row], err_msg=f"PE {pe}, from PE {q}")
                assert (outs[pe][q * dst_pitch + length:(q + 1) * dst_pitch] == 0xFF).all(), "wrote past the row"


@pytest.mark.parametrize("unaligned_pe", [0, 2])
def test_gather_width_is_a_pe_choice(unaligned_pe):
    """A PE whose input is only byte-aligned copies bytes while its peers copy 16-byte vectors."""
    npes, length = 3, 4096
    rng = np.random.default_rng(7)
    with H.world(npes) as w:
        sym = w.alloc(length + 32)
        data = [rng.integers(0, 256, size=length, dtype=np.uint8) for _ in range(npes)]
        outs = []
        for pe in range(npes):
            offset = sym + (1 if pe == unaligned_pe else 0)
            w.view(pe, offset, np.uint8, length)[:] = data[pe]
            dst, out = output(w, npes * length, "bytes")
            outs.append(out)
            call(w, "gather", pe, (w.base(pe) + offset, 0), 0, length, dst, length, "float32", False)
        w.check()
        for pe in range(npes):
            np.testing.assert_array_equal(outs[pe].reshape(npes, length), np.stack(data))


def sequence(rng, npes: int, calls: int):
    """A random mix of calls, the same on every PE (as the Python side plans them from sizes only)."""
    plan = []
    for _ in range(calls):
        kind = rng.choice(["all_reduce", "two_shot", "reduce_scatter", "all_gather", "all_to_all", "push_all_reduce",
                           "push_reduce_scatter", "push_all_gather", "push_all_to_all"])
        dtype = str(rng.choice(DTYPES))
        width = int(rng.choice([1, 7, 64, 333, 4096 + 5]))
        plan.append((str(kind), dtype, width))
    return plan


@pytest.mark.parametrize("chaos", [0.0, 0.05], ids=["plain", "chaos"])
@pytest.mark.parametrize("npes", [2, 3] if H.TSAN else [2, 3, 4])
def test_back_to_back(npes, chaos):
    """Many different calls issued by each PE with no host synchronisation, every input rewritten in
    the same places between calls (on the stream), and the whole sequence replayed twice as a CUDA
    graph would; the remote path's kernels among the others, on the same flags: barrier counters must never mistake an old flag for a new one, and no PE may
    overwrite an input that a peer still reads."""
    rng = np.random.default_rng([npes, int(chaos * 100)])
    plan = sequence(rng, npes, 12 if H.TSAN else 24)
    with H.world(npes, blocks=3, chaos_seed=1 + npes, chaos_rate=chaos) as w:
        staging = w.data_offset()
        sym = w.alloc(npes * 8 * 4200 + 64)
        expected, outs = [], []
        for replay in range(2):
            for kind, dtype, width in plan:
                isz = H.ITEMSIZE[dtype]
                push, kind = kind.startswith("push_"), kind.removeprefix("push_")
                rows = npes if kind in ("reduce_scatter", "all_to_all") else 1
                values = [H.exact_values(rng, (rows, width)) for _ in range(npes)]
                per_pe = []
                for pe in range(npes):
                    raw = H.encode(values[pe], dtype)
                    # Alternate in place and staged per PE and per call.
                    offset = staging if (pe + len(outs)) % 2 else sym
                    host_addr, host = w.private(raw.nbytes)
                    host[:] = raw.view(np.uint8).ravel()
                    w.on_pe(pe)
                    w.ext.emu.memcpy_async(w.base(pe) + offset, host_addr, raw.nbytes, 0)
                    src = (w.base(pe) + offset, width * isz if rows > 1 else 0)
                    gathers = kind in ("all_gather", "all_to_all")
                    # As collectives.py decides it: from the pitches (rows, and a gather's output rows).
                    vec16 = width * isz % 16 == 0 or (rows == 1 and not gathers)
                    if push:
                        dst, out = output(w, (npes if gathers else 1) * width * isz, dtype)
                        call(w, "push_gather" if gathers else "push_reduce", pe, src, 0, width * isz, dst,
                             width * isz if gathers else 0, dtype, vec16, inbox_area(w))
                        row = pe if rows > 1 else 0
                        per_pe.append(np.stack([v[row] for v in values]) if gathers else sum(v[row] for v in values))
                    elif kind in ("all_gather", "all_to_all"):
                        dst, out = output(w, npes * width * isz, dtype)
                        call(w, "gather", pe, src, pe if rows > 1 else 0, width * isz, dst, width * isz, dtype, vec16)
                        per_pe.append(np.stack([v[pe if rows > 1 else 0] for v in values]))
                    else:
                        dst, out = output(w, width * isz, dtype)
                        row = pe if kind == "reduce_scatter" else 0
                        if kind == "two_shot":
                            call(w, "two_shot_all_reduce", pe, src, 0, width * isz, dst, 0, dtype, vec16,
                                 result_area(w))
                        else:
                            call(w, "reduce", pe, src, row, width * isz, dst, 0, dtype, vec16)
                        per_pe.append(sum(v[row] for v in values))
                    outs.append((out, dtype, f"call {len(outs)} ({kind}, {dtype}, {width}) on PE {pe}"))
                expected.extend(per_pe)
        w.check()
        for (out, dtype, what), want in zip(outs, expected):
            np.testing.assert_array_equal(H.decode(out, dtype).reshape(want.shape), want, err_msg=what)


@pytest.mark.parametrize("kernel,waited", [("reduce", "a block barrier"), ("push_reduce", "a put")])
def test_missing_pe_times_out_naming_it(kernel, waited):
    """PE 2 skips a call: PEs 0 and 1 time out naming PE 2, the error surfaces through the launch check
    of their next call as users see it, and nothing hangs."""
    npes, width = 3, 256
    with H.world(npes, timeout_s=1.0, pes_per_node=1 if kernel.startswith("push") else 0) as w:
        sym = w.alloc(width * 4)
        outs = [output(w, width * 4, "float32") for _ in range(npes)]
        for pe in range(2):
            w.view(pe, sym, np.float32, width)[:] = 1.0
            call(w, kernel, pe, (w.base(pe) + sym, 0), 0, width * 4, outs[pe][0], 0, "float32", True, inbox_area(w))
        errors = w.synchronize()
        assert sorted(errors) == [0, 1]
        for pe in (0, 1):
            assert "unspecified launch failure" in errors[pe]
            assert f"PE {pe} timed out after 1.0 s waiting for {waited} from PE 2" in errors[pe]
        w.on_pe(0)
        with pytest.raises(RuntimeError, match=r"cudaGetLastError\(\) failed: unspecified launch failure .*from PE 2"):
            call(w, "reduce", 0, (w.base(0) + sym, 0), 0, width * 4, outs[0][0], 0, "float32", True)


def test_private_input_fails_loudly():
    """A source off the symmetric heap (neither symmetric nor staged) is a bug: the peer-pointer
    lookup stops the kernel with a message instead of reading whatever is there."""
    with H.world(2, timeout_s=1.0) as w:
        errors = {}
        for pe in range(2):
            addr, host = w.private(1024)
            dst, _ = output(w, 1024, "float32")
            try:  # a kernel that fails fast may already fail its launch check
                call(w, "reduce", pe, (addr, 0), 0, 1024, dst, 0, "float32", True)
            except RuntimeError as e:
                errors[pe] = str(e)
        errors = {**w.synchronize(), **errors}
        assert sorted(errors) == [0, 1]
        for pe in range(2):
            assert "nvshmem_ptr: address" in errors[pe]
            assert f"is not in PE {pe}'s symmetric heap" in errors[pe]


def test_host_checks_run_before_any_launch():
    with H.world(2) as w:
        w.on_pe(0)
        with pytest.raises(RuntimeError, match="vec16 was requested for addresses or pitches"):
            call(w, "reduce", 0, (w.base(0) + w.data_offset() + 4, 0), 0, 64, w.base(0) + w.data_offset(), 0,
                 "float32", True)
        with pytest.raises(RuntimeError, match="row 2 is out of range"):
            call(w, "reduce", 0, (w.base(0) + w.data_offset(), 0), 2, 64, w.base(0) + w.data_offset(), 0,
                 "float32", False)
        with pytest.raises(RuntimeError, match="two-shot all-reduce reads row 0"):
            call(w, "two_shot_all_reduce", 0, (w.base(0) + w.data_offset(), 0), 1, 64, w.base(0), 0, "float32",
                 False)
        assert w.ext.reachable_peers(w.base(0)) == [True, True]
