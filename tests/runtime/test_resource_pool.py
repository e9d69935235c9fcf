"""Pools against a cluster's nodes, without Ray: what no placement could ever fix is named per node entry."""

from __future__ import annotations

import ipaddress
import subprocess

from dpo_rl.runtime.cluster import driver_node_address
from dpo_rl.runtime.resource_pool import NodeCapacity, RolePool, per_node_problems


def nodes(*cpus: float, gpus: float = 0.0) -> list[NodeCapacity]:
    return [NodeCapacity(f"10.0.0.{i + 1}", f"id{i}", {"CPU": c, **({"GPU": gpus} if gpus else {})})
            for i, c in enumerate(cpus)]


def test_pools_that_fit_their_nodes_have_no_problem():
    pools = [RolePool("actor", [8, 8], "GPU", config_key="resource_pool.actor_rollout"), RolePool("ref", [8], "GPU")]
    assert per_node_problems(pools, nodes(16, 16, 16, gpus=8)) == []
    assert per_node_problems([RolePool("actor", [2, 0, 1])], nodes(2, 1)) == []  # an empty entry needs no node


def test_an_entry_larger_than_every_node_is_named_with_the_nodes():
    problems = per_node_problems([RolePool("actor", [1, 9], "GPU", config_key="resource_pool.actor_rollout")],
                                 nodes(16, 16, gpus=8))
    assert len(problems) == 1
    assert problems[0].startswith("resource_pool.actor_rollout[1]=9: the 9 processes of this node entry need "
                                  "CPU=9, GPU=9 on one node")
    assert "10.0.0.1 (CPU=16, GPU=8); 10.0.0.2 (CPU=16, GPU=8)" in problems[0]


def test_more_entries_than_nodes_that_hold_them_is_named():
    problems = per_node_problems([RolePool("ref", [1, 1, 1])], nodes(4, 4))
    assert problems == [problems[0]] and "resource_pool.ref=[1, 1, 1]: its 3 node entries each need their own node, " \
                                         "but only 2 node(s)" in problems[0] and "write [3]" in problems[0]
    # big entries need big nodes: [2, 2] over nodes of 2 and 1 CPUs has one holder for two entries
    assert len(per_node_problems([RolePool("ref", [2, 2])], nodes(2, 1, 1))) == 1
    assert per_node_problems([RolePool("ref", [2, 1])], nodes(2, 1)) == []


def test_the_driver_takes_a_loopback_heads_address_and_else_the_route_to_the_head():
    assert driver_node_address("127.0.0.3", 6379) == "127.0.0.3"
    assert driver_node_address("localhost", 6379) == "127.0.0.1"
    own = [a for a in subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
           if not ipaddress.ip_address(a).is_loopback and ipaddress.ip_address(a).version == 4]
    if own:  # a head at this machine's own address: the kernel routes to it from that same address
        assert driver_node_address(own[0], 6379) == own[0]
