"""`gs://` work directories end to end, against a real GCS emulator on loopback.

How the clients reach the emulator (gcsfs and google-cloud-storage through
`STORAGE_EMULATOR_HOST`, tensorstore through `TENSORSTORE_GCS_HTTP_URL` with a test token)
is in tests/storage_emulator.py.
"""

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from tests.storage_emulator import gcs_bucket, gcs_emulator  # noqa: F401 (pytest fixtures)


def test_emulator_serves_files_and_orbax_arrays(gcs_bucket):  # noqa: F811
    """The fixture itself: epath (gcsfs) and Orbax (tensorstore + google-cloud-storage)
    write into the emulated bucket and read back what they wrote."""
    text = epath.Path(f"{gcs_bucket}/run/notes.txt")
    text.parent.mkdir(parents=True, exist_ok=True)
    text.write_text("hello")
    assert text.read_text() == "hello"

    mesh = jax.make_mesh((8,), ("fsdp",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
    array = jax.device_put(np.arange(64, dtype=np.float32).reshape(16, 4), sharding)
    with ocp.CheckpointManager(f"{gcs_bucket}/run/checkpoints") as manager:
        manager.save(3, args=ocp.args.StandardSave({"w": array}))
        manager.wait_until_finished()
    with ocp.CheckpointManager(f"{gcs_bucket}/run/checkpoints") as manager:
        assert manager.all_steps() == [3]
        target = {"w": jax.ShapeDtypeStruct(array.shape, array.dtype, sharding=sharding)}
        restored = manager.restore(3, args=ocp.args.StandardRestore(target))
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(array))
    assert restored["w"].sharding == sharding
