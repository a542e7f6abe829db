"""The fused GEMM's comm kernel (csrc/gemm/gemm.cu) on the emulated device, against the emulated GEMM
(csrc/emu/gemm.cpp), which tags tiles and waits for bands with the GEMM core's numbering
(csrc/gemm/tiles.h) while computing its tiles shuffled per PE or last tile first. The streams fork and
join as python/symcomm/gemm.py does: gemm_begin, the comm kernel on a side stream, the GEMM, join."""

from __future__ import annotations

import re

import numpy as np
import pytest

import emu_harness as H

pytestmark = pytest.mark.emu

ORDERS = {"shuffled": 1, "reversed": 2}
COMM_BLOCKS, GEMM_SMS = 3, 3


def integers(rng, shape, dtype: str) -> np.ndarray:
    """Small nonzero integers: every product and sum is exact in the dtype (bfloat16 has 8 bits)."""
    top = 1 if dtype == "bfloat16" else 2
    return (rng.integers(1, top + 1, size=shape) * rng.choice([-1, 1], size=shape)).astype(np.float64)


class Pe:
    """One PE's host-side buffers and streams."""

    def __init__(self, w: H.World, pe: int):
        self.w, self.pe = w, pe
        w.on_pe(pe)
        self.side = w.ext.emu.stream_create()

    def buffer(self, values: np.ndarray, dtype: str) -> int:
        raw = H.encode(values, dtype)
        addr, host = self.w.private(max(raw.nbytes, 16))
        host[:raw.nbytes] = raw.view(np.uint8).ravel()
        return addr

    def output(self, count: int, dtype: str) -> tuple[int, np.ndarray]:
        addr, host = self.w.private(count * 2)
        out = host.view(H.storage(dtype))
        H.poison(out, dtype)
        return addr, out

    def overlapped(self, comm, gemm, gemm_waits: bool) -> None:
        """python/symcomm/gemm.py's fork and join, on this PE's default and side streams, in its order."""
        e = self.w.ext
        self.w.on_pe(self.pe)
        ws = self.w.base(self.pe)
        e.gemm_begin(ws, 0)
        e.emu.stream_wait_event(self.side, *e.emu.event_record(0))
        if gemm_waits:
            comm(self.side)
            gemm(0)
        else:
            gemm(0)
            comm(self.side)
        e.emu.stream_wait_event(0, *e.emu.event_record(self.side))


MODES = {"gemm_all_reduce": 0, "gemm_reduce_scatter": 1, "all_gather_gemm": 2}


def run(w: H.World, op: str, m: int, n: int, k: int, dtype: str, rng, *, bias: bool, k_major: bool, pes: list[Pe]):
    """Queues one fused call on every PE; returns a check to run after synchronising."""
    e, npes, code = w.ext, w.npes, H.DTYPE_CODES[dtype]
    data = w.data_offset()
    b = integers(rng, (k, n), dtype)
    bias_v = integers(rng, (n,), dtype) * 2 if bias else None
    a = [integers(rng, (m, k), dtype) for _ in range(npes)]
    bs = [integers(rng, (k, n), dtype) for _ in range(npes)]  # each PE's weight shard (not all_gather_gemm)
    outs = []
    for p in pes:
        q = p.pe
        ws = w.base(q)
        weight = b if op == "all_gather_gemm" else bs[q]
        b_ptr = p.buffer(weight.T.copy() if k_major else weight, dtype)
        ldb = k if k_major else n
        lda = k + 8  # rows of a are apart more than k
        a_pad = np.zeros((m, lda))
        a_pad[:, :k] = a[q]
        a_ptr = p.buffer(a_pad, dtype)
        if op == "gemm_all_reduce":
            d_ptr, out = p.output(m * n, dtype)
            partial = m * n * 2
            result = data + (partial + 255) // 256 * 256
            bias_ptr = p.buffer(bias_v, dtype) if bias and q == 0 else 0
            p.overlapped(
                lambda s: e.gemm_comm(ws, 0, m, n, 0, data, result, 0, 0, d_ptr, n, code, COMM_BLOCKS, s),
                lambda s: e.gemm(ws, m, n, k, 1, a_ptr, lda, 0, b_ptr, ldb, k_major, ws + data, n, 0, bias_ptr, code,
                                 True, False, True, GEMM_SMS, s), gemm_waits=False)
        elif op == "gemm_reduce_scatter":
            d_ptr, out = p.output(m // npes * n, dtype)
            p.overlapped(
                lambda s: e.gemm_comm(ws, 1, m, n, 0, data, 0, 0, 0, d_ptr, n, code, COMM_BLOCKS, s),
                lambda s: e.gemm(ws, m, n, k, 1, a_ptr, lda, 0, b_ptr, ldb, k_major, ws + data, n, 0, 0, code, True,
                                 False, True, GEMM_SMS, s), gemm_waits=False)
        else:
            d_ptr, out = p.output(npes * m * n, dtype)
            p.overlapped(
                lambda s: e.gemm_comm(ws, 2, m, 0, k, data, 0, a_ptr, lda, 0, n, code, COMM_BLOCKS, s),
                lambda s: e.gemm(ws, m, n, k, npes, ws + data, k, m * k, b_ptr, ldb, k_major, d_ptr, n, m * n, 0, code,
                                 False, True, False, GEMM_SMS, s), gemm_waits=True)
        outs.append(out)

    def check():
        if op == "all_gather_gemm":
            want = np.concatenate(a) @ b
        else:
            want = sum(a[q] @ bs[q] for q in range(npes)) + (bias_v if bias else 0)
        for q in range(npes):
            expect = want[q * (m // npes):(q + 1) * (m // npes)] if op == "gemm_reduce_scatter" else want
            got = H.decode(outs[q], dtype).reshape(expect.shape)
            np.testing.assert_array_equal(got, expect, err_msg=f"{op} {m}x{n}x{k} on PE {q}")

    return check


SHAPES = [(1, 8, 8), (130, 264, 16), (300, 520, 24)]


@pytest.mark.parametrize("order", sorted(ORDERS))
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
@pytest.mark.parametrize("npes", [2, 3] if H.TSAN else [2, 3, 4])
@pytest.mark.parametrize("op", sorted(MODES))
def test_fused(op, npes, shape, dtype, order):
    m, n, k = shape
    if op == "gemm_reduce_scatter":
        m = m // npes * npes or npes  # rows that straddle tiles: 300 / 3 = 100 rows per PE
    rng = np.random.default_rng([npes, m, len(op), len(dtype), ORDERS[order]])
    with H.world(npes, gemm_order=ORDERS[order], chaos_seed=npes) as w:
        pes = [Pe(w, q) for q in range(npes)]
        check = run(w, op, m, n, k, dtype, rng, bias=op == "gemm_all_reduce", k_major=m % 2 == 0, pes=pes)
        w.check()
        check()


@pytest.mark.parametrize("chaos", [0.0, 0.05], ids=["plain", "chaos"])
def test_back_to_back(chaos):
    """Every op, several shapes, one after another with no host synchronisation, twice over: each call's
    tags are new, so no kernel may take a tile or band of an earlier call for its own."""
    npes = 3
    rng = np.random.default_rng(17)
    with H.world(npes, chaos_seed=4, chaos_rate=chaos) as w:
        pes = [Pe(w, q) for q in range(npes)]
        checks = []
        for _ in range(2):
            for op in sorted(MODES):
                for m, n, k in [(130, 264, 16), (9, 8, 8)]:
                    if op == "gemm_reduce_scatter":
                        m = m // npes * npes
                    checks.append(run(w, op, m, n, k, "float16", rng, bias=op == "gemm_all_reduce", k_major=False,
                                      pes=pes))
        w.check()
        for check in checks:
            check()


def test_missing_gemm_times_out_naming_the_pe():
    """PE 1's GEMM never runs (its comm kernel does): PE 0's comm kernel reports the tile it waited for,
    naming PE 1."""
    npes, m, n, k = 2, 128, 256, 8
    with H.world(npes, timeout_s=1.0) as w:
        e, data = w.ext, w.data_offset()
        pes = [Pe(w, q) for q in range(npes)]
        for p in pes:
            ws = w.base(p.pe)
            d_ptr, _ = p.output(m * n, "float16")
            a_ptr = p.buffer(np.ones((m, k)), "float16")
            b_ptr = p.buffer(np.ones((k, n)), "float16")
            comm = lambda s: e.gemm_comm(ws, 0, m, n, 0, data, data + m * n * 2, 0, 0, d_ptr, n, 1, 2, s)
            gemm = lambda s: e.gemm(ws, m, n, k, 1, a_ptr, k, 0, b_ptr, n, False, ws + data, n, 0, 0, 1, True, False,
                                    True, 1, s)
            p.overlapped(comm, gemm if p.pe == 0 else (lambda s: None), gemm_waits=False)
        errors = w.synchronize()
        # Whichever of PE 0's waits ends first: its reducer's for the tile, or its copier's at the last
        # barrier (PE 1's copier waits for PE 0's reduced tile).
        assert re.search(r"PE 0 timed out after 1.0 s waiting for (a GEMM tile|a block barrier) from PE 1",
                         errors[0]), errors


def test_host_checks():
    with H.world(2) as w:
        e, ws = w.ext, w.base(0)
        w.on_pe(0)
        with pytest.raises(RuntimeError, match="the comm kernel needs 2 to 64 blocks, got 1"):
            e.gemm_comm(ws, 0, 128, 256, 0, 0, 0, 0, 0, ws, 256, 1, 1, 0)
        with pytest.raises(RuntimeError, match="reduce-scatter: m must divide by the PEs"):
            e.gemm_comm(ws, 1, 127, 256, 0, 0, 0, 0, 0, ws, 256, 1, 2, 0)
        with pytest.raises(RuntimeError, match="output tiles: 8193 exceed the limit of 8192"):
            e.gemm_comm(ws, 0, 128 * 8193, 256, 0, 0, 0, 0, 0, ws, 256, 1, 2, 0)
        with pytest.raises(RuntimeError, match="16-byte vectors"):
            e.gemm_comm(ws, 0, 128, 260, 0, 0, 0, 0, 0, ws, 256, 1, 2, 0)

        # What the GEMM core's TMA descriptors need, which CUTLASS only asserts (compiled out).
        def gemm(a=ws, lda=64, a_batch=0, b=ws, ldb=256, d=ws, batches=1):
            e.gemm(ws, 128, 256, 64, batches, a, lda, a_batch, b, ldb, False, d, 256, 0, 0, 1, False, False, True, 1, 0)

        aligned = "16-byte aligned A, B, D and bias, and leading dimensions and batch strides that are multiples of 8"
        for bad in ({"a": ws + 2}, {"b": ws + 8}, {"d": ws + 4}, {"lda": 68}, {"ldb": 260},
                    {"batches": 2, "a_batch": 128 * 64 + 4}):
            with pytest.raises(RuntimeError, match=aligned):
                gemm(**bad)
        with pytest.raises(RuntimeError, match=r"strides of A and B must be below 2\^40 bytes"):
            gemm(lda=1 << 39)
        with pytest.raises(RuntimeError, match="leading dimensions must hold a row"):
            gemm(lda=56)


def test_mixed_with_collectives_and_moe():
    """Collectives, MoE dispatch and combine, and fused GEMMs interleaved with no host synchronisation:
    they share each block index's barrier count, with grids of different sizes."""
    from test_emu_collectives import call, output
    from test_emu_moe import Moe

    npes = 3
    rng = np.random.default_rng(23)
    with H.world(npes, blocks=4) as w:
        pes = [Pe(w, q) for q in range(npes)]
        sym = w.alloc(20001 * 4)
        checks = []
        for round_ in range(2):
            width = 20000 + round_
            values = [H.exact_values(rng, width) for _ in range(npes)]
            outs = []
            for q in range(npes):
                host_addr, host = w.private(width * 4)
                host.view(np.float32)[:] = values[q]
                w.on_pe(q)
                w.ext.emu.memcpy_async(w.base(q) + sym, host_addr, width * 4, 0)  # after the last round read it
                dst, out = output(w, width * 4, "float32")
                outs.append(out)
                call(w, "reduce", q, (w.base(q) + sym, 0), 0, width * 4, dst, 0, "float32", True)
            checks.append(lambda outs=outs, values=values: [
                np.testing.assert_array_equal(o, sum(values)) for o in outs])
            m = Moe(w, rng, [5, 0, 3], 2, 2, hidden=16, dtype="bfloat16", capacity=8)
            for q in range(npes):
                m.dispatch(q)
                m.combine(q, m.expert_x)
            checks.append(lambda m=m: m.check_combine(np.ones(m.experts)))
            checks.append(run(w, "gemm_all_reduce", 130, 264, 16, "float16", rng, bias=True, k_major=False, pes=pes))
        w.check()
        for check in checks:
            check()
