"""The device code of the symcomm._C that pip installed, read with cuobjdump and nvdisasm (tests/device_code.py):
its resource table, co-residency of the blocks that wait for each other, and the memory orderings as
compiled. No GPU needed; a missing tool is a failure."""

import pytest

import device_code as dc
from symcomm import runtime

pytestmark = pytest.mark.device_code


@pytest.fixture(scope="module")
def built():
    """Every cubin of the installed extension, disassembled once."""
    img = dc.image(dc.installed_extension())
    dc.with_dynamic_shared(img.kernels, runtime.load_extension())
    return img


def test_the_resource_table_is_what_the_build_produced(built):
    assert dc.TABLE.read_text() == dc.resource_table(built), (
        f"{dc.TABLE.relative_to(dc.ROOT)} is not what this build produced: python3 tests/device_code.py --write")


def test_the_kernels_are_read_for_hopper(built):
    hopper = [k for k in built.kernels if k.arch == "sm_90a"]
    assert {dc.role(k) for k in hopper} >= {"peers", "fused", "none"}, [k.name for k in hopper]


def test_machine_code_for_hopper_and_blackwell_and_no_ptx(built):
    """The device link of relocatable code keeps no PTX, so a GPU runs only the machine code that is here:
    every kernel for sm_90a and sm_100a, but the fused GEMM's core (wgmma) for sm_90a alone."""
    by_arch = {arch: {k.name for k in built.kernels if k.arch == arch} for arch in ("sm_90a", "sm_100a")}
    assert {k.arch for k in built.kernels} == set(by_arch)
    assert {n.split("<")[0] for n in by_arch["sm_90a"] - by_arch["sm_100a"]} == {"GemmUniversal"}
    assert not by_arch["sm_100a"] - by_arch["sm_90a"]
    assert dc.run_tool("cuobjdump", "--list-ptx", str(built.path)).strip() == ""


def test_no_kernel_spills(built):
    assert not dc.spill_problems(built)


def test_every_kernel_fits_an_sm(built):
    tight = [(k.name, k.arch, dc.blocks_per_sm(k)) for k in built.kernels if (dc.blocks_per_sm(k) or (1,))[0] < 1]
    assert not tight


def test_the_gemm_core_launches_with_its_shared_memory(built):
    cores = [k for k in built.kernels if k.name.startswith("GemmUniversal")]
    # A launch asking for more than a block may have fails; none would mean the binding answered for another.
    assert len(cores) == 4 and all(0 < k.shared + k.dynamic_shared <= dc.HOPPER.shared_per_block for k in cores)
    assert all(k.dynamic_shared > 0 for k in cores)


@pytest.mark.parametrize("pes, percents", list(dc.mps_scenarios()))
def test_blocks_that_wait_for_each_other_are_resident_at_once(built, pes, percents):
    problems = dc.co_residency_problems(built.kernels, dc.H100_SMS, pes, percents, runtime.load_extension())
    assert not problems, "\n".join(problems)


def test_the_orderings_and_the_gemm_core_as_compiled(built):
    problems = dc.ordering_problems(built)
    assert not problems, "\n".join(problems)
