"""Cloud TPU slice names → the topology libtpu compiles for (`sft_jax.topology`)."""

import pytest

from sft_jax import topology
from tests import required


@pytest.mark.parametrize(
    ("name", "topology_name", "chips", "hbm_gib"),
    [
        ("v5p-8", "v5:2x2x1", 4, 95),  # one host
        ("v5p-128", "v5:4x4x4", 64, 95),
        ("v5p-256", "v5:4x4x8", 128, 95),
        ("v4-32", "v4:2x2x4", 16, 32),
        ("v4-64", "v4:2x4x4", 32, 32),
        ("v5e-16", "v5e:4x4", 16, 16),
        ("v5litepod-8", "v5e:2x4", 8, 16),
        ("v6e-128", "v6e:8x16", 128, 32),
        ("v6e-256", "v6e:16x16", 256, 32),
    ],
)
def test_slice_names_give_cloud_tpus_topologies(name, topology_name, chips, hbm_gib):
    s = topology.parse(name)
    assert (s.topology_name, s.chips, s.hbm_bytes) == (topology_name, chips, hbm_gib * 2**30)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("v5p", "expected a Cloud TPU slice name such as v5p-128"),
        ("h100-8", "expected a Cloud TPU slice name"),
        ("v5p-7", "count TensorCores"),
        ("v5e-12", "power-of-two number of chips"),
    ],
)
def test_a_name_that_is_no_slice_is_refused_with_the_forms_accepted(name, message):
    with pytest.raises(ValueError, match=message):
        topology.parse(name)


def test_the_slice_devices_come_from_the_tpu_compiler():
    required.importorskip("libtpu", reason="libtpu (the TPU compiler) is in the test extras")
    devices = topology.devices(topology.parse("v6e-16"))
    assert len(devices) == 16 and devices[0].device_kind == "TPU v6 lite"
