"""A multi-node Ray cluster on this machine, for tests: Ray's own harness (``ray.cluster_utils.Cluster``),
each node a raylet of its own with its own loopback address (127.0.0.2, 127.0.0.3, ...) and resources,
started with the project's hygiene (the Ray HOME with an empty bootstrap config, usage stats off, loopback only).

A rank on node 127.0.0.3 sees 127.0.0.3 as its node address, so a rendezvous that wrongly used 127.0.0.1
(or the driver's address) instead of rank 0's node shows up here as it would on real machines.

Run as a module it starts the cluster, writes its addresses to a JSON file and keeps it up until its
standard input closes (so a test can run it under ``strace -f`` and see every process of the cluster)::

    python -m tests.runtime.loopback_cluster --cpus 1 1 2 --dashboard-port 8299 --info cluster.json
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import Optional

from dpo_rl.runtime.cluster import _loopback_only_cluster, prepare_ray_home, ray_process_env
from dpo_rl.workers.megatron.parallel_state import free_port

HEAD_ADDRESS = "127.0.0.1"


def node_addresses(count: int) -> list[str]:
    """Loopback addresses for ``count`` worker nodes (the head keeps 127.0.0.1)."""
    return [f"127.0.0.{i + 2}" for i in range(count)]


def start_cluster(cpus_per_node: list[float], dashboard_port: Optional[int] = None):
    """A head with no CPUs (nothing but the driver's and jobs' supervisors runs there) and one worker node per
    entry of ``cpus_per_node``; with ``dashboard_port`` the head serves Ray's dashboard (and its job API) on
    127.0.0.1. Returns the started ``ray.cluster_utils.Cluster``."""
    from ray.cluster_utils import Cluster

    head = {"num_cpus": 0, "node_ip_address": HEAD_ADDRESS, "include_dashboard": dashboard_port is not None}
    if dashboard_port is not None:
        # the job agent's port too: Ray's fixed default (52365) may still be held by an agent of a cluster that is
        # shutting down, and then no job can be submitted ("No available agent to submit job")
        head.update(dashboard_host=HEAD_ADDRESS, dashboard_port=dashboard_port,
                    dashboard_agent_listen_port=free_port(HEAD_ADDRESS))
    with ray_process_env(prepare_ray_home()), _loopback_only_cluster():
        cluster = Cluster(initialize_head=True, head_node_args=head)
        for cpus, address in zip(cpus_per_node, node_addresses(len(cpus_per_node))):
            cluster.add_node(num_cpus=cpus, node_ip_address=address)
    return cluster


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpus", type=float, nargs="+", required=True, help="CPUs of each worker node")
    parser.add_argument("--dashboard-port", type=int, default=None)
    parser.add_argument("--info", required=True, help="JSON file to write the cluster's addresses to")
    args = parser.parse_args(argv)
    cluster = start_cluster(args.cpus, args.dashboard_port)
    info = {"address": cluster.address, "nodes": node_addresses(len(args.cpus)),
            "dashboard": f"http://{HEAD_ADDRESS}:{args.dashboard_port}" if args.dashboard_port else None}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a killed test still takes the cluster down
    try:
        Path(args.info).write_text(json.dumps(info))
        sys.stdin.read()  # until the test closes our standard input
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()
