"""init / finalize / empty / free, and the errors of calls made at the wrong time."""

import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import symcomm
from symcomm import runtime


@pytest.fixture
def fresh():
    """No symcomm state during the test; a session's world (plain pytest runs everything in one
    process) is stopped before and restarted after."""
    session = symcomm.runtime._state.init_args if symcomm.is_initialized() else None
    symcomm.finalize()
    yield
    symcomm.finalize()
    if session:
        symcomm.init(*session)


def test_calls_before_init_raise(fresh):
    x = torch.randn(4)
    for call in (symcomm.rank, symcomm.world_size, symcomm.backend, lambda: symcomm.empty((2,)),
                 lambda: torch.ops.symcomm.all_reduce(x), lambda: torch.ops.symcomm.all_gather(x, 0)):
        with pytest.raises(symcomm.NotInitializedError, match=r"call symcomm.init\(\) first"):
            call()


def test_init_twice_same_args_is_a_no_op_different_args_raise(fresh):
    assert symcomm.init(backend="torch") == "torch"
    assert symcomm.init(backend="torch") == "torch"
    with pytest.raises(RuntimeError, match="already initialised"):
        symcomm.init(backend="torch", workspace_bytes=1 << 20)


def test_finalize_twice_is_a_no_op_and_ops_raise_after_it(fresh):
    symcomm.init(backend="torch")
    symcomm.finalize()
    symcomm.finalize()
    with pytest.raises(symcomm.NotInitializedError):
        torch.ops.symcomm.all_reduce(torch.randn(3))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"backend": "mpi"}, ValueError, "backend must be one of"),
        ({"workspace_bytes": 0}, ValueError, "workspace_bytes must be a positive int"),
        ({"workspace_bytes": 1.5}, ValueError, "workspace_bytes must be a positive int"),
        ({"timeout_s": -1}, ValueError, "timeout_s must be a positive number"),
    ],
)
def test_init_rejects_bad_arguments(fresh, kwargs, error, match):
    with pytest.raises(error, match=match):
        symcomm.init(**kwargs)
    assert not symcomm.is_initialized()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_nvshmem_backend_without_gpu_says_why(fresh):
    with pytest.raises(RuntimeError, match="nvshmem backend is unavailable.*no CUDA GPU"):
        symcomm.init(backend="nvshmem")
    assert not symcomm.is_initialized()
    assert symcomm.init(backend="auto") == "torch"


BUILT = "90a-real,100a-real"


@pytest.mark.parametrize("capability, archs, built_for", [
    ((9, 0), BUILT, True), ((10, 0), BUILT, True),
    ((8, 0), BUILT, False), ((12, 0), BUILT, False),
    ((10, 3), BUILT, False),  # arch-specific machine code runs on its own minor only
    ((10, 0), "90a-real,90-virtual", False),  # the device link keeps no PTX to compile for another GPU
    ((8, 9), "80-real", True), ((8, 6), "89", False),  # plain machine code runs on later minors of its major
    ((10, 3), "100f-real", True),
    ((9, 0), "native", True),  # not recorded: the kernels' load tells
])
def test_the_kernels_run_where_the_build_has_machine_code_for_the_gpu(capability, archs, built_for):
    problem = runtime._arch_problem(capability, archs)
    assert (problem is None) == built_for, problem
    if problem:
        assert problem.startswith(f"this GPU has compute capability {capability[0]}.{capability[1]}, and symcomm._C "
                                  f"holds machine code for sm_")


@pytest.fixture
def a_gpu_of(monkeypatch):
    """Makes torch on this CPU machine report one GPU of the compute capability given (the extension, with
    its archs, is the one installed), with a gloo-only process group: this torch has no NCCL."""
    def fake(capability):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        start = runtime._start_process_group
        monkeypatch.setattr(runtime, "_start_process_group", lambda device, shared_gpu, *rest: start(device, True, *rest))
    return fake


@pytest.mark.skipif(torch.cuda.is_available(), reason="fakes a GPU on a machine without one")
def test_a_gpu_the_kernels_were_not_built_for_falls_back_to_torch_saying_why(fresh, a_gpu_of, caplog):
    a_gpu_of((8, 0))
    archs = ", ".join(f"sm_{a.partition('-')[0]}" for a in runtime.load_extension().cuda_archs.split(",")
                      if not a.endswith("-virtual"))
    why = f"this GPU has compute capability 8.0, and symcomm._C holds machine code for {archs} only"
    with pytest.raises(RuntimeError, match=f"nvshmem backend is unavailable \\(rank 0: {why}\\)"):
        symcomm.init(backend="nvshmem")
    with caplog.at_level(logging.INFO, logger="symcomm"):
        assert symcomm.init(backend="auto") == "torch"
    assert caplog.messages == [f"symcomm: using the torch backend because rank 0: {why}"]
    assert caplog.records[0].levelno == logging.WARNING


def test_the_emulated_device_is_chosen_by_its_variable_only(fresh, monkeypatch, tmp_path):
    assert not runtime.emulated()
    monkeypatch.setenv(runtime.EMU_MODULE_ENV, str(tmp_path / "missing.so"))
    runtime.load_extension.cache_clear()
    runtime.emulated.cache_clear()
    try:
        assert runtime.emulated()
        with pytest.raises(RuntimeError, match=r"the emulated device could not be loaded \(SYMCOMM_EMU_MODULE="):
            symcomm.init(backend="nvshmem")
        assert not symcomm.is_initialized()
    finally:
        monkeypatch.delenv(runtime.EMU_MODULE_ENV)
        runtime.load_extension.cache_clear()
        runtime.emulated.cache_clear()


@pytest.mark.parametrize("value, expected", [("0", None), ("2", 2), ("-1", "expected ranks per node"),
                                             ("two", "is not an integer")])
def test_pretend_nodes_take_ranks_per_node_or_say_what_is_wrong(monkeypatch, value, expected):
    monkeypatch.setenv(runtime.PES_PER_NODE_ENV, value)
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=f"SYMCOMM_PES_PER_NODE.*{expected}"):
            runtime._pes_per_node()
    else:
        assert runtime._pes_per_node() == expected


@pytest.mark.parametrize(
    "shape, error, match",
    [((-1, 2), ValueError, r"shape\[0\] must be >= 0"), ((2, 1.5), TypeError, r"shape\[1\] must be an int"),
     ("3", TypeError, "shape must be a tuple of ints")],
)
def test_empty_rejects_bad_shapes(fresh, shape, error, match):
    symcomm.init(backend="torch")
    with pytest.raises(error, match=match):
        symcomm.empty(shape)


def test_empty_free_and_is_symmetric(fresh):
    symcomm.init(backend="torch")
    t = symcomm.empty((3, 5), torch.bfloat16)
    z = symcomm.empty((0,), torch.float32)
    assert t.shape == (3, 5) and t.dtype == torch.bfloat16 and t.is_contiguous()
    assert symcomm.is_symmetric(t) and symcomm.is_symmetric(t[1:]) and symcomm.is_symmetric(z)
    plain = torch.empty(3, 5)
    assert not symcomm.is_symmetric(plain)
    with pytest.raises(ValueError, match="not a live tensor allocated by symcomm.empty"):
        symcomm.free(plain)
    symcomm.free(t)
    symcomm.free(z)
    with pytest.raises(ValueError, match="freed already"):
        symcomm.free(t)


def test_free_waits_for_queued_work_on_every_rank_first(fresh, monkeypatch):
    # A kernel queued before free may still read the tensor, here or on a peer, and the next empty()
    # may reuse its memory: on the nvshmem backend, free syncs the device, then meets every rank.
    symcomm.init(backend="torch")
    state = symcomm.runtime._state
    t = symcomm.empty((4,))
    calls = []
    monkeypatch.setattr(state, "backend", "nvshmem")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(("synchronize", device)))
    monkeypatch.setattr(symcomm.runtime.dist, "barrier", lambda: calls.append(("barrier",)))
    monkeypatch.setattr(symcomm.runtime, "_free", lambda st, raw: calls.append(("free", raw.data_ptr())))
    symcomm.free(t)
    assert calls == [("synchronize", state.device), ("barrier",), ("free", t.data_ptr())]


def test_cuda_device_is_the_class_nvshmem4py_takes():
    pytest.importorskip("cuda.core", reason="cuda-core is not installed")
    nvshmem_core = pytest.importorskip("nvshmem.core", reason="nvshmem4py is not installed")
    # The module that defines nvshmem.core.init, and the Device it means.
    init_module = sys.modules[nvshmem_core.init.__module__]
    assert symcomm.runtime._cuda_device_class() is init_module.Device


EVERY_RANK = textwrap.dedent(
    """
    import os, torch, symcomm
    rank = int(os.environ["RANK"])
    def outcome(call):
        try:
            call()
            return "ok"
        except Exception as e:
            return type(e).__name__
    before = outcome(lambda: torch.ops.symcomm.all_reduce(torch.randn(4)))
    nvshmem = outcome(lambda: symcomm.init(backend="nvshmem"))
    symcomm.init(backend="torch")
    bad = outcome(lambda: torch.ops.symcomm.reduce_scatter(torch.randn(3, 2), 0))
    symcomm.finalize()
    print(f"rank {rank}: before={before} nvshmem={nvshmem} bad={bad}", flush=True)
    """
)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error under torchrun")
def test_errors_reach_every_rank(tmp_path):
    script = tmp_path / "every_rank.py"
    script.write_text(EVERY_RANK)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", str(script)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank}: before=NotInitializedError nvshmem=RuntimeError bad=ValueError" in out.stdout, out.stdout
