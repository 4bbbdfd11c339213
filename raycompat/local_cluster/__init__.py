"""A real multi-node Ray cluster on 127.0.0.1, started with ``ray start``.

``LocalCluster`` starts one head node and N worker nodes as separate raylets on
this machine, each declaring its own CPUs, GPUs and custom resources, so that
placement, node loss and Ray Jobs can be exercised without a cloud. It records
which processes belong to each node and stops exactly those: never
``ray stop``, which kills every Ray process of every user of the machine.

Which processes are a node's: each ``ray start`` runs as the leader of a new
session (``setsid``). The daemons it spawns (GCS, raylet, dashboard, agents)
and the workers the raylet forks later inherit that session id. ``ray start``
exits once its node is up, and Linux hands out no pid that is still a live
process's session id, so the processes whose session id is that pid are
exactly the node's. A JSON state file in the cluster directory keeps address,
dashboard URL, session ids and pids, so another process can stop the cluster
(``python -m raycompat.local_cluster down --dir DIR``).

Loopback only: ``ray start --node-ip-address=127.0.0.1`` and
``ray.init(address="127.0.0.1:PORT")`` both rewrite 127.0.0.1 to the machine's
routable IP, unless Ray's single-node mode (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``)
is on, and that mode makes ``ray start --address`` refuse to join. So the nodes
are started through a small bootstrap that runs Ray's own CLI without the
rewrite, and their processes (Ray workers, job drivers) run in single-node mode,
in which 127.0.0.1 stays 127.0.0.1. Every address the cluster advertises and
listens on is 127.0.0.1. A driver started outside the cluster needs
``LOOPBACK_CLIENT_ENV`` in its environment before importing ray (see
``LocalCluster.client_env``); ``ray job submit`` needs nothing.

Authentication: Ray 2.60 turns token authentication on for ``ray start --head``
whenever a token is available (``~/.ray/auth_token``, which a local
``ray.init()`` creates, or ``RAY_AUTH_TOKEN``); clients without
``RAY_AUTH_MODE=token`` and the token then fail ("Missing authentication
token"). These nodes run with ``RAY_AUTH_MODE=disabled``: the cluster is
reachable from this machine only, and ``ray job submit`` / the Jobs SDK work
without a token.
"""

from raycompat.local_cluster.cluster import LocalCluster
from raycompat.local_cluster.processes import (
    LOOPBACK,
    LOOPBACK_CLIENT_ENV,
    STATE_FILE,
    node_states,
)

__all__ = ["LocalCluster", "LOOPBACK", "LOOPBACK_CLIENT_ENV", "STATE_FILE", "node_states"]
