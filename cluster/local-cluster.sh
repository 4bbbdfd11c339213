#!/usr/bin/env bash
# A real multi-node Ray cluster on 127.0.0.1 (a head + N worker nodes), e.g.:
#   cluster/local-cluster.sh up --workers 2 --worker-resources '{"transform": 1}' --dir /tmp/rc
#   cluster/local-cluster.sh status --dir /tmp/rc
#   cluster/local-cluster.sh down --dir /tmp/rc
# `down` stops exactly the processes `up` started (never `ray stop`).
set -euo pipefail
exec "${PYTHON:-python}" -m raycompat.local_cluster "$@"
