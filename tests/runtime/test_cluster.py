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

import pytest

from dpo_rl.errors import ConfigError
from dpo_rl.runtime.cluster import BOOTSTRAP_FILE, prepare_ray_home, start_ray, stop_ray
from dpo_rl.runtime.resource_pool import RolePool, create_pools, remove_pools


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


def remote_addresses(text: str) -> tuple[set, str]:
    """The IP addresses an ``strace -e trace=connect,sendto`` log connected or sent to (IPv4-mapped ones
    unwrapped), and the log."""
    found = set(re.findall(r'inet_addr\("([0-9.]+)"\)', text)) | set(re.findall(r'inet_pton\(AF_INET6, "([0-9a-f:.]+)"', text))

    def plain(address: str):
        ip = ipaddress.ip_address(address)
        return getattr(ip, "ipv4_mapped", None) or ip

    return {plain(a) for a in found}, text


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
    subprocess.run(["strace", "-f", "-qq", "-e", "trace=connect,sendto", "-o", str(trace), sys.executable, "-c", script],
                   check=True, env=env, timeout=240, capture_output=True)
    remote, text = remote_addresses(trace.read_text())
    allowed = local_addresses()
    outside = {a for a in remote if not a.is_loopback and str(a) not in allowed}
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
