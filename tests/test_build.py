"""The built extension: how it links, what it contains, and that its errors are exceptions."""

import platform
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from symcomm import runtime

ext = runtime.load_extension()
SO = Path(ext.__file__)  # the installed copy: the build folder's carries the build's RUNPATH

# What design.md has the extension link dynamically: the NVSHMEM host library by its versioned name; then
# the C++ runtime, the C library and its dynamic loader. Nothing else: not libcudart (static), not libtorch.
LOADERS = {"x86_64": "ld-linux-x86-64.so.2", "aarch64": "ld-linux-aarch64.so.1"}
NEEDED = {"libnvshmem_host.so.3", "libstdc++.so.6", "libgcc_s.so.1", "libc.so.6", LOADERS[platform.machine()]}


def readelf(*args: str) -> str:
    assert shutil.which("readelf"), "readelf (binutils) is needed to inspect the extension"
    return subprocess.run(["readelf", *args, str(SO)], check=True, capture_output=True, text=True).stdout


def dynamic_section() -> list[tuple[str, str]]:
    """(tag, value) of each entry of the dynamic section: ("NEEDED", "libc.so.6"), ("RUNPATH", "a:b")."""
    return re.findall(r"^\s*0x[0-9a-f]+\s+\((\w+)\)\s+.*?\[(.*)\]$", readelf("-d", "-W"), re.M)


@pytest.mark.device_code
def test_links_exactly_nvshmem_host_and_the_c_and_cpp_runtimes():
    needed = [value for tag, value in dynamic_section() if tag == "NEEDED"]
    assert sorted(needed) == sorted(NEEDED)


@pytest.mark.device_code
def test_searches_no_build_folder_nor_the_working_directory():
    # An empty entry is the current directory to the loader; pip's build folder is gone after the install.
    entries = [(tag, entry) for tag, value in dynamic_section() if tag in ("RPATH", "RUNPATH")
               for entry in value.split(":")]
    assert not [e for e in entries if not e[1] or re.search(r"pip-build-env|/build/", e[1])], entries


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

