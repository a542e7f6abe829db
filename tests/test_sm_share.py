"""How many SMs a PE's kernels may use (runtime._sm_share), and the MPS server query behind it, on CPU."""

import os

import pytest

from symcomm import runtime

H200 = 132


@pytest.mark.parametrize(
    "pes, env, answer, share",
    [
        (1, {}, None, H200),  # a GPU of our own, no MPS
        (4, {}, None, H200 // 4),  # time-sliced without MPS: equal shares cost nothing there
        (4, {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "25"}, None, 33),
        (2, {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "30"}, None, 39),
        (2, {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "12.5"}, "100", 16),  # the variable wins over the server
        (4, {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "100"}, None, H200 // 4),  # shares adding up to 400%
        (2, {}, "100.0", H200 // 2),  # the server's default: every client may take the whole GPU
        (2, {}, "20", 26),
        (1, {}, "50", 66),
        (2, {}, "exit status 1 (Cannot find MPS control daemon process)", H200 // 2),
        (3, {}, "", H200 // 3),
        (1, {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "0.1"}, None, 1),  # never no SM at all
    ],
)
def test_share(pes, env, answer, share):
    got, why = runtime._sm_share(H200, pes, env, answer)
    assert got == share, why
    assert got * pes <= H200 or got == 1, "the PEs on the GPU together need more SMs than it has"


def test_share_says_why():
    assert runtime._sm_share(H200, 2, {}, "20") == (26, "the MPS server's default percentage, 20")
    _, why = runtime._sm_share(H200, 2, {}, "oops")
    assert why == "the MPS server gave no default percentage ('oops'), so 100, split evenly among the 2 PEs on the GPU"


@pytest.mark.parametrize("raw", ["abc", "0", "-5", "101", ""])
def test_bad_percentage_variable_raises(raw):
    with pytest.raises(ValueError, match=f"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE={raw!r} is not a percentage in"):
        runtime._sm_share(H200, 1, {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": raw}, None)


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
    assert runtime._sm_share(H200, 2, mps, answer)[0] == 33


def test_no_server_without_the_control_program_or_the_pipe_directory(mps, tmp_path):
    assert runtime._mps_server_answer({**mps, "PATH": str(tmp_path)}) is None
    assert runtime._mps_server_answer({**mps, "CUDA_MPS_PIPE_DIRECTORY": str(tmp_path / "none")}) is None


def test_a_failing_server_gives_the_even_split(mps):
    control = os.path.join(mps["PATH"], runtime.MPS_CONTROL)
    with open(control, "w") as f:
        f.write("#!/bin/sh\necho 'Cannot find MPS control daemon process' >&2\nexit 1\n")
    answer = runtime._mps_server_answer(mps)
    assert answer == "exit status 1 (Cannot find MPS control daemon process)"
    assert runtime._sm_share(H200, 2, mps, answer)[0] == H200 // 2
