"""Ray start-up: no traffic beyond this machine, no writes to the real home, bounded waits."""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dpo_rl.errors import ConfigError
from dpo_rl.runtime.cluster import BOOTSTRAP_FILE, prepare_ray_home, start_ray, stop_ray
from dpo_rl.runtime.resource_pool import RolePool, create_pools, remove_pools

ROOT = Path(__file__).resolve().parents[2]


def test_prepare_ray_home_writes_an_empty_bootstrap_config(tmp_path):
    home = prepare_ray_home(tmp_path / "h")
    assert (home / BOOTSTRAP_FILE).read_text().strip() == "{}"


def local_addresses() -> set[str]:
    addresses = {"0.0.0.0", "::", "::1"}
    try:
        addresses.update(info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None))
    except socket.gaierror:
        pass
    out = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    addresses.update(out)
    return addresses


#: ``strace`` logging every process's connects and sends. ``--seccomp-bpf`` stops a traced process only at those
#: calls (plain ``-f`` stops it at every system call: the vLLM engine's start-up took 75 s instead of 16 s, for
#: the same log); a kernel without seccomp makes strace warn and trace as plain ``-f`` does.
STRACE_CONNECTS = ("strace", "-f", "--seccomp-bpf", "-qq", "-e", "trace=connect,sendto")


def remote_addresses(text: str) -> tuple[set, str]:
    """The IP addresses an ``strace -e trace=connect,sendto`` log connected or sent to (IPv4-mapped ones
    unwrapped), and the log."""
    found = set(re.findall(r'inet_addr\("([0-9.]+)"\)', text)) | set(re.findall(r'inet_pton\(AF_INET6, "([0-9a-f:.]+)"', text))

    def plain(address: str):
        ip = ipaddress.ip_address(address)
        return getattr(ip, "ipv4_mapped", None) or ip

    return {plain(a) for a in found}, text


def beyond_this_machine(remote: set) -> set:
    """The addresses of :func:`remote_addresses` that are neither loopback nor one of this machine's own."""
    allowed = local_addresses()
    return {a for a in remote if not a.is_loopback and str(a) not in allowed}


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_ray_start_connects_only_to_this_machine(tmp_path):
    script = textwrap.dedent(
        f"""
        import ray
        from dpo_rl.runtime.cluster import start_ray, stop_ray
        start_ray(num_cpus=1, home_dir={str(tmp_path / 'rayhome')!r})
        @ray.remote
        def f():
            return 1
        assert ray.get(f.remote()) == 1
        import time; time.sleep(8)  # give the dashboard head time for its usage-stats start-up
        stop_ray()
        """
    )
    trace = tmp_path / "trace"
    env = {**os.environ, "HOME": str(tmp_path / "realhome")}
    (tmp_path / "realhome").mkdir()
    subprocess.run([*STRACE_CONNECTS, "-o", str(trace), sys.executable, "-c", script],
                   check=True, env=env, timeout=240, capture_output=True)
    remote, text = remote_addresses(trace.read_text())
    outside = beyond_this_machine(remote)
    assert not outside, f"Ray start-up connected beyond this machine: {outside}"
    assert "169.254.169.254" not in text and "metadata.google" not in text
    assert remote, "the trace saw no connections at all; strace did not follow Ray's processes"
    # Ray's auth token and files went to the project's Ray home, not the (fake) real home.
    assert not any((tmp_path / "realhome").iterdir())
    assert (tmp_path / "rayhome" / BOOTSTRAP_FILE).exists()


@pytest.fixture
def small_cluster():
    start_ray(num_cpus=2)
    yield
    stop_ray()


def test_pools_larger_than_the_cluster_fail_at_once(small_cluster):
    pools = [RolePool("actor", [8]), RolePool("ref", [1])]
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"CPU: need 9, cluster has 2.*actor=\[8\]"):
        create_pools(pools, timeout_s=30)
    assert time.perf_counter() - start < 5


def test_pools_that_cannot_be_placed_fail_within_the_timeout(small_cluster):
    import ray

    @ray.remote(num_cpus=1)
    class Hog:
        def ping(self):
            return 1

    hog = Hog.remote()
    ray.get(hog.ping.remote())  # one of the two CPUs is now taken
    pools = [RolePool("actor", [2])]
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="were not ready within ray.resource_timeout_s=2s"):
        create_pools(pools, timeout_s=2)
    assert time.perf_counter() - start < 15
    ray.kill(hog)
    fits = [RolePool("actor", [1])]
    create_pools(fits, timeout_s=10)  # after the failure nothing is left holding resources
    remove_pools(fits)



def test_a_hosts_file_that_cannot_name_the_mapped_loopback_is_reported(tmp_path, caplog):
    from dpo_rl.runtime.cluster import warn_if_loopback_names_need_dns

    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n# ::ffff:127.0.0.1 localhost\n")
    with caplog.at_level("WARNING", logger="dpo_rl.runtime.cluster"):
        assert warn_if_loopback_names_need_dns(str(hosts))
    assert "::ffff:127.0.0.1 localhost" in caplog.text and str(hosts) in caplog.text
    hosts.write_text("127.0.0.1 localhost\n::ffff:127.0.0.1 localhost\n")
    assert not warn_if_loopback_names_need_dns(str(hosts))


# -- start-up retries, oversubscription, and the watcher that takes the cluster down with the driver ----------
def test_start_up_is_retried_within_its_budget_then_fails_with_one_message():
    from dpo_rl.errors import ClusterUnavailable
    from dpo_rl.runtime.cluster import start_with_retries

    calls, shutdowns = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise TimeoutError("The current node timed out during startup.")

    start_with_retries(flaky, lambda: shutdowns.append(1), timeout_s=10, pause_s=0.01)
    assert (len(calls), len(shutdowns)) == (3, 2)  # each failed start is cleaned up before the next

    def never():
        raise RuntimeError("Failed to start the GCS server.\nmore detail")

    start = time.monotonic()
    with pytest.raises(ClusterUnavailable) as err:
        start_with_retries(never, lambda: None, timeout_s=0.3, pause_s=0.05)
    assert time.monotonic() - start < 2
    message = str(err.value)
    assert re.match(r"Ray did not start: \d+ attempt\(s\) within ray.start_timeout_s=0.3 s failed, the last with "
                    r"RuntimeError: Failed to start the GCS server\. ", message)
    assert "\n" not in message and "ray stop" in message


def test_oversubscription_is_a_warning_with_numbers_unless_chosen():
    from dpo_rl.runtime.cluster import oversubscription_warning

    warning = oversubscription_warning(10, 2, None)
    assert warning.startswith("the resource pools ask for 10 CPU slots but this machine has 2 cores")
    assert "about 0.20 of a core each" in warning and "set ray.num_cpus=10 to choose this" in warning
    assert oversubscription_warning(10, 2, 10) is None  # ray.num_cpus set: the user chose it
    assert oversubscription_warning(2, 2, None) is None


def test_a_killed_driver_takes_its_local_cluster_with_it(tmp_path):
    from tests.cli_runs import MARK, leftover_processes

    script = textwrap.dedent("""
        import os, sys, time
        import ray
        from dpo_rl.runtime.cluster import start_ray
        start_ray(num_cpus=2)
        actors = [ray.remote(num_cpus=1)(type("W", (), {"pid": lambda self: os.getpid()})).remote() for _ in range(2)]
        print(ray.get([a.pid.remote() for a in actors]), flush=True)
        time.sleep(600)
    """)
    mark = f"reaper-{os.getpid()}-{time.time()}"
    driver = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=dict(os.environ, **{MARK: mark}),
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    worker_pids = eval(driver.stdout.readline())
    assert len(worker_pids) == 2
    os.kill(driver.pid, 9)
    driver.wait()
    start = time.monotonic()
    assert leftover_processes(mark, wait_s=20) == []  # without the watcher: Ray's agents lived on ~60 s
    assert time.monotonic() - start < 20
