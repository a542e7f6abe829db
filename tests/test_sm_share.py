"""How many SMs a PE's kernels may use (runtime._sm_share), and the MPS server query behind it, on CPU."""

import logging
import os
from types import SimpleNamespace

import pytest
import torch

from symcomm import runtime

H200 = 132
PCT = "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"


@pytest.mark.parametrize(
    "pes, env, answer, reported, share",
    [
        (1, {}, None, H200, H200),  # a GPU of our own, no MPS
        (4, {}, None, H200, H200 // 4),  # time-sliced without MPS: equal shares cost nothing there
        (2, {PCT: "30"}, None, H200, H200 // 2),  # the variable without a server limits nothing
        # Under MPS the count a client reads is its share already: taken as it is, not cut again.
        (2, {PCT: "50"}, "100", 66, 66),
        (4, {PCT: "25"}, "100", 33, 33),
        (2, {PCT: "12.5"}, "100", 16, 16),
        (2, {PCT: "50"}, "25", 33, 33),  # the server's lower default is what the client gets
        (4, {PCT: "100"}, "100", H200, H200 // 4),  # shares adding up to 400%: an equal split
        (4, {PCT: "50"}, "100", 66, H200 // 4),  # 200%: an equal split of the GPU the share implies
        (3, {PCT: "40"}, "100", 53, H200 // 3),
        (2, {}, "100.0", H200, H200 // 2),  # the server's default: every client may take the whole GPU
        (2, {}, "20", 26, 26),
        (1, {}, "50", 66, 66),
        (2, {}, "exit status 1 (Cannot find MPS control daemon process)", H200, H200 // 2),
        (3, {}, "", H200, H200 // 3),
        (1, {PCT: "0.1"}, "100", 0, 1),  # never no SM at all
    ],
)
def test_share(pes, env, answer, reported, share):
    got, why = runtime._sm_share(reported, pes, env, answer)
    assert got == share, why
    assert got * pes <= H200 or got == 1, "the PEs on the GPU together need more SMs than it has"


def test_share_says_why():
    assert runtime._sm_share(26, 2, {}, "20") == (26, "MPS at the server's default percentage, 20, which the count "
                                                      "already reflects")
    _, why = runtime._sm_share(H200, 2, {PCT: "50"}, "oops")
    assert why == (f"no MPS server answered ('oops'), so {PCT}=50 limits nothing; split evenly among the 2 PEs on "
                   f"the GPU's {H200} SMs")
    _, why = runtime._sm_share(66, 4, {PCT: "50"}, "100")
    assert why == f"MPS at {PCT}=50, which the count already reflects; split evenly among the 4 PEs on the GPU's " \
                  f"about {H200} SMs"


@pytest.mark.parametrize("raw", ["abc", "0", "-5", "101", ""])
def test_bad_percentage_variable_raises(raw):
    with pytest.raises(ValueError, match=f"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE={raw!r} is not a percentage in"):
        runtime._sm_share(H200, 1, {PCT: raw}, None)


@pytest.fixture
def mps(tmp_path):
    """A stand-in nvidia-cuda-mps-control on PATH that answers 25 to the percentage query (and fails on
    anything else), and an MPS pipe directory: the environment a client of a running server sees."""
    bin_dir, pipe = tmp_path / "bin", tmp_path / "mps"
    bin_dir.mkdir()
    pipe.mkdir()
    control = bin_dir / runtime.MPS_CONTROL
    control.write_text('#!/bin/sh\nread cmd\n[ "$cmd" = get_default_active_thread_percentage ] || exit 3\necho 25.0\n')
    control.chmod(0o755)
    return {"PATH": str(bin_dir), "CUDA_MPS_PIPE_DIRECTORY": str(pipe)}


def test_server_is_asked_for_its_default(mps):
    answer = runtime._mps_server_answer(mps)
    assert answer == "25.0"
    assert runtime._sm_share(33, 2, mps, answer)[0] == 33


def test_init_takes_the_count_mps_reports_and_logs_it(mps, monkeypatch, caplog):
    """Two PEs at 50% each: a client reads 66 SMs of 132, and uses all 66 of them."""
    env = {**mps, PCT: "50"}
    control = os.path.join(mps["PATH"], runtime.MPS_CONTROL)
    with open(control, "w") as f:
        f.write("#!/bin/sh\nread cmd\n[ \"$cmd\" = get_default_active_thread_percentage ] || exit 3\necho 100.0\n")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(multi_processor_count=66))
    monkeypatch.setattr(runtime.dist, "all_reduce", lambda tensor, op: None)
    state = runtime._State("nvshmem", 1, 2, torch.device("cuda", 0), 10.0, False, True, 2)
    with caplog.at_level(logging.INFO, logger="symcomm"):
        assert runtime._agreed_sm_share(state) == 66
    assert caplog.messages == [f"symcomm: rank 1 may use 66 SMs: the GPU reports 66 (cudaDevAttrMultiProcessorCount, "
                               f"{PCT}=50); MPS at {PCT}=50, which the count already reflects"]


def test_no_server_without_the_control_program_or_the_pipe_directory(mps, tmp_path):
    assert runtime._mps_server_answer({**mps, "PATH": str(tmp_path)}) is None
    assert runtime._mps_server_answer({**mps, "CUDA_MPS_PIPE_DIRECTORY": str(tmp_path / "none")}) is None


def test_a_failing_server_gives_the_even_split(mps):
    control = os.path.join(mps["PATH"], runtime.MPS_CONTROL)
    with open(control, "w") as f:
        f.write("#!/bin/sh\necho 'Cannot find MPS control daemon process' >&2\nexit 1\n")
    answer = runtime._mps_server_answer(mps)
    assert answer == "exit status 1 (Cannot find MPS control daemon process)"
    assert runtime._sm_share(H200, 2, {**mps, PCT: "50"}, answer)[0] == H200 // 2
