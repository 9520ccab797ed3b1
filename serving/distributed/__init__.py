"""Several ``jax.distributed`` processes serving one engine (``docs/multihost.md``).

``channel``: the control channel between process 0 and the others (steps, heartbeats, loss);
``lockstep``: process 0's ``LeaderEngine`` and the others' ``FollowerEngine``; ``launcher``:
``xds launch``, N local processes with a coordinator.
"""
