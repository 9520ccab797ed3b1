"""One of 2 processes (4 CPU devices each) checking ``xds_jax.multihost.move`` across them:
``python tests/serving/move_worker.py COORDINATOR PROCESS_ID``; exits 0 and prints ``ok``
when every case lands where asked with the source's values, without a host round trip.
Started by ``test_multiprocess.py``."""

from __future__ import annotations

import sys

from sharding.processes import DistributedConfig, initialize, native_stdout_to_stderr


def main(coordinator: str, process_id: int) -> None:
    native_stdout_to_stderr()  # gloo prints its connections
    initialize(DistributedConfig(coordinator, 2, process_id), devices_needed=8)
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

    from xds_jax import multihost

    devices = jax.devices()  # 0-3 on process 0, 4-7 on process 1

    def on(ids: list[int], *spec) -> NamedSharding:
        return NamedSharding(Mesh(np.array([devices[i] for i in ids]), ("x",)),
                             PartitionSpec(*spec))

    cases = {  # name: (source sharding, destination sharding)
        "replicated TP pair -> one device (a PD pull)": (on([0, 1]),
                                                         SingleDeviceSharding(devices[5])),
        "sharded over 4 -> one device": (on([0, 1, 2, 3], None, "x"),
                                         SingleDeviceSharding(devices[6])),
        "one device -> sharded over 4 (4 rounds)": (SingleDeviceSharding(devices[2]),
                                                    on([4, 5, 6, 7], "x")),
        "spanning -> overlapping replicated": (on([3, 4]), on([4, 5])),
        "served from the destination's process": (on([0, 4]), SingleDeviceSharding(devices[5])),
        "back: decode device -> prefill pair": (SingleDeviceSharding(devices[7]), on([0, 1])),
        "within process 0": (SingleDeviceSharding(devices[1]), SingleDeviceSharding(devices[2])),
    }
    host_reads = []
    real = multihost._gather_first
    multihost._gather_first = lambda *a: host_reads.append(1) or real(*a)
    for i, (name, (src, dst)) in enumerate(cases.items()):
        value = np.arange(8 * 12, dtype=np.float32).reshape(8, 12) * (i + 1)
        a = multihost.place(value, src)
        host_reads.clear()
        b = multihost.move({"k": a}, dst)["k"]
        assert not host_reads, f"{name}: moved through host memory"
        assert b.sharding == dst, f"{name}: landed on {b.sharding}"
        for shard in b.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), value[shard.index],
                                          err_msg=name)
        np.testing.assert_array_equal(multihost.fetch(b), value, err_msg=name)
    print("ok", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
