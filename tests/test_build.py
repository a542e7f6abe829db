"""The built extension: how it links, what it contains, and that its errors are exceptions."""

import shutil
import subprocess
from pathlib import Path

import pytest

from symcomm import runtime

ext = runtime.load_extension()
SO = Path(ext.__file__)


def readelf(*args: str) -> str:
    assert shutil.which("readelf"), "readelf (binutils) is needed to inspect the extension"
    return subprocess.run(["readelf", *args, str(SO)], check=True, capture_output=True, text=True).stdout


def test_links_nvshmem_host_dynamically_and_not_libtorch():
    needed = [line.split("[")[1].rstrip("]") for line in readelf("-d").splitlines() if "(NEEDED)" in line]
    assert "libnvshmem_host.so.3" in needed
    assert not [n for n in needed if "torch" in n or n.startswith("libcudart")], needed


def test_contains_its_own_nvshmem_device_state_and_exports_none_of_it():
    # The device library is linked statically: its state variable is in our fatbin...
    assert b"nvshmemi_device_state_d" in SO.read_bytes()
    # ...and no NVSHMEM symbol is exported, so torch's own copy can't be interposed with ours.
    exported = [line for line in readelf("--dyn-syms", "-W").splitlines() if " GLOBAL " in line and " UND " not in line]
    assert exported and not [line for line in exported if "nvshmem" in line.lower()]


def test_built_for_hopper_against_the_pinned_nvshmem():
    assert "90a" in ext.cuda_archs
    assert tuple(ext.nvshmem_version) == (3, 4, 5)


def test_device_state_registration_raises_before_host_init():
    # Must be an exception, not NVSHMEM's exit(-1): a library may not end its host process.
    with pytest.raises(RuntimeError, match="not initialised"):
        ext.init_device_state(10.0)


def test_kernel_launcher_checks_arguments_before_launch():
    with pytest.raises(RuntimeError, match="epoch must be positive"):
        ext.ring_put_signal(0, 0, 0, 0, 0, 0)


def test_the_fused_gemm_plans_with_the_kernels_sizes():
    from symcomm import gemm

    assert (gemm.TILE_M, gemm.TILE_N, gemm.MAX_TILES) == (ext.gemm_tile_m, ext.gemm_tile_n, ext.max_gemm_tiles)

