"""Online DPO on a multi-node Ray cluster on this machine (tests/runtime/loopback_cluster.py: four worker nodes
of one CPU each, at 127.0.0.2-5, and a head with none), launched as users launch on a cluster: ``ray job submit``.

The roles land on different nodes (the actor's TP=2 ranks on two of them), each role's rendezvous is on its
rank 0's node, the metrics equal the single-node run's, and the whole cluster, traced with ``strace -f``
from its start, connects to nothing beyond this machine. Joining by ``ray.address`` and the per-node
pool error run against the same cluster.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dpo_rl.errors import ConfigError
from dpo_rl.runtime.cluster import QUIET_RAY_ENV, prepare_ray_home
from dpo_rl.trainer.run import run
from dpo_rl.workers.megatron.parallel_state import free_port
from tests.runtime.loopback_cluster import node_addresses
from tests.runtime.test_cluster import STRACE_CONNECTS, beyond_this_machine, remote_addresses
from tests.trainer.conftest import small_config, small_run_overrides

ROOT = Path(__file__).resolve().parents[2]
NODE_CPUS = (1, 1, 1, 1)
TP2_ACROSS_NODES = ("++actor_rollout_ref.actor_rollout.tensor_model_parallel_size=2",
                    "actor_rollout_ref.actor_rollout.num_gpus_for_train=2", "resource_pool.actor_rollout=[1,1]")
#: What a test may send a job's working directory without (local outputs; the lock's virtual environment).
JOB_EXCLUDES = [".venv/", ".git/", "runs/", "outputs/", "examples/tiny_world/artifacts/"]
STRACE = shutil.which("strace")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The loopback cluster, with Ray's dashboard (the job API) on 127.0.0.1, run under ``strace -f`` when there
    is one (every process of the cluster, the submitted job's driver and its workers included, is traced)."""
    work = tmp_path_factory.mktemp("cluster")
    info_file, trace = work / "cluster.json", work / "trace"
    command = [sys.executable, "-m", "tests.runtime.loopback_cluster", "--cpus", *map(str, NODE_CPUS),
               "--dashboard-port", str(free_port()), "--info", str(info_file)]
    if STRACE:
        command = [*STRACE_CONNECTS, "-o", str(trace), *command]
    namespace = hosts_namespace(work / "hosts", len(NODE_CPUS))
    command = [*(namespace or []), *command]
    log = (work / "cluster.log").open("w")
    process = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while not info_file.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"the loopback cluster did not start: {(work / 'cluster.log').read_text()[-3000:]}")
        time.sleep(0.5)
    info = json.loads(info_file.read_text())
    yield {**info, "trace": trace if STRACE and namespace else None}
    process.stdin.close()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


def hosts_namespace(hosts: Path, nodes: int) -> list[str] | None:
    """A command prefix that runs the cluster in a mount namespace of its own whose ``/etc/hosts`` also names the
    nodes' loopback addresses (and their IPv4-mapped forms); ``None`` where namespaces are not allowed.

    PyTorch's ``TCPStore`` looks up the name of every peer that connects (``getnameinfo``); an address the hosts
    file does not list is asked of the DNS resolver, a query that leaves the machine (docs/troubleshooting.md,
    "What listens on the network"). A real cluster's resolver knows its nodes; here the hosts file must.
    """
    if not shutil.which("unshare"):
        return None
    lines = ["::ffff:127.0.0.1 localhost"]
    for address in node_addresses(nodes):
        name = f"dpo-rl-node-{address.rsplit('.', 1)[1]}"
        lines += [f"{address} {name}", f"::ffff:{address} {name}"]
    hosts.write_text(Path("/etc/hosts").read_text() + "\n".join(lines) + "\n")
    bind = ["sh", "-c", f'mount --bind "{hosts}" /etc/hosts && exec "$@"', "sh"]
    for unshare in (["unshare", "--mount"], ["unshare", "--user", "--map-root-user", "--mount"]):
        if subprocess.run([*unshare, *bind, "true"], capture_output=True).returncode == 0:
            return [*unshare, *bind]
    return None


def ray_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """The ``ray`` command of this environment, with the project's Ray HOME (as its docs/ray.md tells users)."""
    env = {**os.environ, "HOME": str(prepare_ray_home()), **QUIET_RAY_ENV}
    return subprocess.run([sys.executable, "-m", "ray.scripts.scripts", *args], cwd=ROOT, env=env, timeout=timeout,
                          capture_output=True, text=True)


def test_online_dpo_across_nodes_as_a_ray_job_equals_the_single_node_run(cluster, world_dir, tmp_path):
    out = tmp_path / "multi"
    overrides = small_run_overrides(world_dir, out, *TP2_ACROSS_NODES)
    submit_id = f"dpo-rl-test-{os.getpid()}"
    submit = ("job", "submit", "--address", cluster["dashboard"], "--submission-id", submit_id, "--working-dir", ".",
              "--runtime-env-json", json.dumps({"excludes": JOB_EXCLUDES}),
              "--", sys.executable, "ray_gpt.py", "--config-name", "online_dpo_trainer_tiny", *overrides)
    deadline = time.monotonic() + 90
    while True:  # a fresh head's job agent registers a few seconds after the dashboard answers ("try again later")
        submitted = ray_cli(*submit)
        if "No available agent to submit job" not in submitted.stderr or time.monotonic() > deadline:
            break
        time.sleep(2)
    status = ray_cli("job", "status", "--address", cluster["dashboard"], submit_id)
    assert f"Job '{submit_id}' succeeded" in status.stdout, f"{submitted.stdout[-4000:]}\n{submitted.stderr[-2000:]}\n{status.stdout}"
    logs = ray_cli("job", "logs", "--address", cluster["dashboard"], submit_id).stdout
    progress = [line for line in logs.splitlines() if re.search(r"\bstep \d+/3\b", line)]
    assert len(progress) == 3 and "step 3/3" in progress[-1], logs[-3000:]  # one line per step at log_interval=1

    # Every role on nodes of the cluster, the actor's two TP ranks on two of them, each rendezvous on rank 0's node.
    log = (out / "ray_gpt.log").read_text()
    placed = dict(re.findall(r"\] - (\w+): torch.distributed rendezvous at ([0-9.]+):\d+", log))
    ranks = dict(re.findall(r"\] - (\w+): torch.distributed rendezvous .*ranks on nodes (\[.*\])", log))
    assert set(placed) == {"actor", "ref", "reward"}, log
    assert set(placed.values()) <= set(cluster["nodes"])  # never the driver's 127.0.0.1
    actor_nodes = ast.literal_eval(ranks["actor"])  # the list the worker group logged
    assert len(set(actor_nodes)) == 2 and actor_nodes[0] == placed["actor"]
    assert len({node for nodes in ranks.values() for node in ast.literal_eval(nodes)}) >= 3

    # The same seed on one node gives the same metrics, byte for byte.
    single = tmp_path / "single"
    run(small_config(world_dir, single, *TP2_ACROSS_NODES[:2], "resource_pool.actor_rollout=[2]"))
    assert (out / "metrics.jsonl").read_text() == (single / "metrics.jsonl").read_text()
    assert (out / "report.html").exists()

    if cluster["trace"] is not None:  # the cluster since its start, the job and its workers
        remote, text = remote_addresses(cluster["trace"].read_text())
        outside = beyond_this_machine(remote)
        assert not outside, f"the multi-node run connected beyond this machine: {outside}"
        assert "169.254.169.254" not in text and "metadata.google" not in text
        nodes = {str(a) for a in remote}
        assert set(cluster["nodes"]) <= nodes, "the trace did not see the worker nodes' connections"


def test_joining_by_address_a_node_entry_no_node_holds_is_named(cluster, world_dir, tmp_path):
    start = time.monotonic()
    with pytest.raises(ConfigError) as caught:
        run(small_config(world_dir, tmp_path / "big", f"ray.address={cluster['address']}",
                         "++actor_rollout_ref.actor_rollout.tensor_model_parallel_size=2",
                         "actor_rollout_ref.actor_rollout.num_gpus_for_train=2", "resource_pool.actor_rollout=[2]"))
    message = str(caught.value)
    assert "resource_pool.actor_rollout[0]=2" in message and "no node of the cluster has that much" in message
    assert "127.0.0.2 (CPU=1)" in message and "resource pool asks for more" not in message  # it fits in total
    assert time.monotonic() - start < 60  # at once, not after ray.resource_timeout_s
