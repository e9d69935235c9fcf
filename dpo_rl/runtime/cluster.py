"""Start or join a Ray cluster without sending traffic beyond this machine.

Ray's dashboard head asks cloud-metadata addresses (169.254.169.254,
metadata.google.internal) which cloud it runs on, unless ``~/ray_bootstrap_config.yaml``
exists (``ray/_common/usage/usage_lib.py: get_cluster_config_to_report``), even with usage
stats disabled. So every Ray process this project starts runs with ``HOME`` set to a
project-owned directory holding an empty (``{}``) bootstrap config; that also keeps Ray's
``~/.ray/auth_token`` out of the user's real home. Usage stats are off
(``RAY_USAGE_STATS_ENABLED=0``), and the address Ray would send its one "usage stats are
disabled" report to is a closed loopback port (:data:`QUIET_RAY_ENV`). A local cluster lives
on 127.0.0.1, and its dashboard binds to 127.0.0.1 unless configured.
"""

from __future__ import annotations

import contextlib
import getpass
import ipaddress
import logging
import math
import os
import socket
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator, Optional

from dpo_rl.errors import ClusterUnavailable, ConfigError
from dpo_rl.runtime.reaper import MARK_ENV, Reaper

logger = logging.getLogger(__name__)

BOOTSTRAP_FILE = "ray_bootstrap_config.yaml"

#: What every Ray process this project starts gets, and what a driver keeps: usage stats off, and the report URL
#: on loopback. Ray's dashboard still sends one "disabled" report (``usage_stats_head.py:
#: _report_disabled_usage_sync``) to ``RAY_USAGE_STATS_REPORT_URL`` (https://usage-stats.ray.io/) for a cluster
#: not started by ``ray.init`` (``ray start``, a multi-node cluster), and resolves its name with the DNS resolver
#: even when the report then fails; port 9 (discard) on loopback takes nothing.
QUIET_RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_USAGE_STATS_REPORT_URL": "http://127.0.0.1:9/"}


def default_ray_home() -> Path:
    """A per-user directory under the system temp dir."""
    return Path(tempfile.gettempdir()) / f"dpo_rl-ray-home-{getpass.getuser()}"


def prepare_ray_home(path: Optional[str | Path] = None) -> Path:
    """Create ``path`` (default :func:`default_ray_home`) holding an empty bootstrap config."""
    home = Path(path) if path else default_ray_home()
    home.mkdir(parents=True, exist_ok=True)
    bootstrap = home / BOOTSTRAP_FILE
    if not bootstrap.exists():
        bootstrap.write_text("{}\n")
    return home


@contextlib.contextmanager
def ray_process_env(home: Path, mark: Optional[str] = None) -> Iterator[None]:
    """Environment for starting Ray processes: HOME = ``home``, :data:`QUIET_RAY_ENV`, and ``mark`` (when given) under
    :data:`~dpo_rl.runtime.reaper.MARK_ENV` so the cluster's processes can be found (:mod:`dpo_rl.runtime.reaper`).

    Processes started inside (the local cluster's raylet, dashboard and workers) keep it;
    the driver's own environment is restored afterwards.
    """
    saved = {k: os.environ.get(k) for k in ("HOME", *QUIET_RAY_ENV, MARK_ENV)}
    os.environ["HOME"] = str(home)
    os.environ.update(QUIET_RAY_ENV)
    if mark is not None:
        os.environ[MARK_ENV] = mark
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        os.environ.update(QUIET_RAY_ENV)


#: Ray's switch for single-machine clusters: with it off, Ray uses the loopback address as
#: the node IP instead of finding "its" IP by connecting a UDP socket towards a public DNS
#: server (8.8.8.8), which it would otherwise do in the driver and in its agents.
SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def _loopback_only_cluster() -> Iterator[None]:
    """Start a local cluster on 127.0.0.1 only: child processes read the env var, the driver's
    already-imported constant is switched for the duration of ``ray.init``."""
    from ray._private import ray_constants  # deferred: Ray, only when a run uses it

    saved_env, saved_const = os.environ.get(SINGLE_MACHINE_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[SINGLE_MACHINE_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_const
        if saved_env is None:
            os.environ.pop(SINGLE_MACHINE_ENV, None)
        else:
            os.environ[SINGLE_MACHINE_ENV] = saved_env


#: The watcher of the local cluster this process started (:mod:`dpo_rl.runtime.reaper`); Ray's own state is
#: per process too, so there is one at most.
_reaper: Optional[Reaper] = None


def start_ray(
    *,
    address: Optional[str] = None,
    num_cpus: Optional[int] = None,
    include_dashboard: bool = False,
    dashboard_host: str = "127.0.0.1",
    home_dir: Optional[str] = None,
    connect_timeout_s: float = 30.0,
    start_timeout_s: float = 120.0,
) -> dict:
    """``ray.init`` for this project: join ``address`` (or ``RAY_ADDRESS``), else start locally (retried
    within ``start_timeout_s``; its processes go when this process goes, :mod:`dpo_rl.runtime.reaper`).

    Returns ``ray.cluster_resources()``. Idempotent when Ray is already initialised.
    """
    global _reaper
    import ray  # deferred: Ray, only when a run uses it

    if ray.is_initialized():
        return ray.cluster_resources()
    home = prepare_ray_home(home_dir)
    address = resolve_address(address or os.environ.get("RAY_ADDRESS"))
    if address:
        join_ray(address, home, connect_timeout_s)
        return ray.cluster_resources()
    warn_if_loopback_names_need_dns()
    mark = uuid.uuid4().hex
    _reaper = Reaper(mark)
    env_vars = {"HOME": str(home), **QUIET_RAY_ENV, MARK_ENV: mark}
    try:
        with ray_process_env(home, mark), _loopback_only_cluster():
            # address="local": a new cluster even when `ray start` left one on this machine (Ray would join it)
            start_with_retries(lambda: ray.init(address="local", num_cpus=num_cpus,
                                                include_dashboard=include_dashboard, dashboard_host=dashboard_host,
                                                logging_level=logging.WARNING, log_to_driver=True,
                                                runtime_env={"env_vars": env_vars}),
                               ray.shutdown, start_timeout_s)
    except BaseException:
        _finish_reaper()
        raise
    return ray.cluster_resources()


def resolve_address(address: Optional[str]) -> Optional[str]:
    """``auto`` -> the address of the cluster ``ray start`` last started on this machine (Ray's own record);
    anything else unchanged."""
    if address != "auto":
        return address
    from ray._private.services import get_ray_address_from_environment  # deferred: Ray, only when a run uses it

    found = get_ray_address_from_environment("auto", None)
    if found in (None, "auto"):
        raise ConfigError(["ray.address=auto, but no Ray cluster was started on this machine (`ray start --head`); "
                           "give the head's host:port, or unset ray.address / RAY_ADDRESS to start a local cluster"])
    return found


def join_ray(address: str, home: Path, connect_timeout_s: float) -> None:
    """``ray.init`` joining the cluster at ``address``, saying which address this driver uses for it.

    The driver's node address is the head's when the head is on loopback (a cluster of this machine; Ray would
    otherwise swap 127.0.0.1 for the address of its default route), else the address of the interface that
    routes to the head (the kernel's answer for a UDP socket aimed at it; no packet is sent), so Ray never
    probes a public address (8.8.8.8) to find it. A ``ray://`` (Ray Client) address needs neither.
    """
    import ray  # deferred: Ray, only when a run uses it

    check_reachable(address, connect_timeout_s)
    endpoint = head_endpoint(address)
    client = address.startswith("ray://")
    node_address = None if client or endpoint is None else driver_node_address(*endpoint)
    loopback = node_address is not None and ipaddress.ip_address(node_address).is_loopback
    logger.info("joining Ray cluster at %s%s", address, f" as node address {node_address}" if node_address else "")
    with ray_process_env(home), (_loopback_only_cluster() if loopback else contextlib.nullcontext()):
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True,
                 **({"_node_ip_address": node_address} if node_address else {}))


def driver_node_address(host: str, port: int) -> str:
    """The address of this machine's interface that routes to ``host:port`` (loopback for a loopback head)."""
    try:
        if ipaddress.ip_address(host).is_loopback:
            return host
    except ValueError:
        if host == "localhost":
            return "127.0.0.1"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect((host, port))  # UDP: sets the route only, nothing is sent
        return probe.getsockname()[0]


def start_with_retries(start: Callable[[], object], shutdown: Callable[[], None], timeout_s: float,
                       pause_s: float = 2.0) -> None:
    """Call ``start`` until it succeeds; after a failure ``shutdown`` cleans up and, while ``timeout_s`` lasts,
    it is tried again. Then one :class:`ClusterUnavailable` says how often and why it failed."""
    deadline = time.monotonic() + timeout_s
    attempts = 0
    while True:
        attempts += 1
        try:
            start()
            return
        except Exception as err:  # noqa: BLE001 - Ray's start-up raises many kinds; each is retried the same way
            shutdown()
            reason = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0].rstrip('.')}"
            if time.monotonic() + pause_s >= deadline:
                raise ClusterUnavailable(
                    f"Ray did not start: {attempts} attempt(s) within ray.start_timeout_s={timeout_s:g} s failed, the "
                    f"last with {reason}. A loaded machine (check `uptime`), a full /tmp (Ray's session files; `df "
                    f"-h /tmp`) or Ray processes left from an earlier run (`ray stop`) are the usual causes; raise "
                    f"ray.start_timeout_s to wait longer") from None
            logger.warning("Ray start-up attempt %d failed (%s); retrying", attempts, reason)
            time.sleep(pause_s)


def oversubscription_warning(cpu_demand: float, cores: int, num_cpus: Optional[int]) -> Optional[str]:
    """The warning for a local cluster whose pools ask for more CPU slots than the machine has cores, unless
    ``ray.num_cpus`` was set (the user chose the size); ``None`` when there is nothing to say."""
    if num_cpus is not None or cpu_demand <= cores:
        return None
    return (f"the resource pools ask for {cpu_demand:g} CPU slots but this machine has {cores} cores, so the "
            f"workers time-share them (about {cores / cpu_demand:.2f} of a core each; slower, and a loaded machine "
            f"can time out start-up); set ray.num_cpus={math.ceil(cpu_demand)} to choose this, or give fewer "
            "processes in resource_pool")


def machine_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


#: How torch.distributed's store sees its peer on one machine (its client socket is dual-stack).
MAPPED_LOOPBACK = "::ffff:127.0.0.1"


def warn_if_loopback_names_need_dns(hosts_file: str = "/etc/hosts") -> bool:
    """Warn (and return True) when ``hosts_file`` cannot name :data:`MAPPED_LOOPBACK`.

    PyTorch's ``TCPStore`` looks up the host name of every peer address it connects to or accepts
    (``getnameinfo``); on one machine that is ``::ffff:127.0.0.1``, which a usual ``/etc/hosts`` (naming
    only ``127.0.0.1``) does not list, so glibc asks the configured DNS resolver: one PTR query per
    rendezvous leaves the machine. Nothing in the project can switch that lookup off; one line in
    ``/etc/hosts`` answers it locally (docs/troubleshooting.md, "What listens on the network").
    """
    try:
        lines = Path(hosts_file).read_text().splitlines()
    except OSError:
        return False
    named = any(line.split("#", 1)[0].split()[:1] == [MAPPED_LOOPBACK] for line in lines)
    if not named:
        logger.warning("%s does not name %s: each torch.distributed rendezvous will ask your DNS resolver for it "
                       "(a PTR query leaves this machine); add the line '%s localhost' to %s to answer it locally",
                       hosts_file, MAPPED_LOOPBACK, MAPPED_LOOPBACK, hosts_file)
    return not named


def head_endpoint(address: str) -> Optional[tuple[str, int]]:
    """(host, port) of a cluster address ``host:port`` or ``ray://host:port``; None for ``auto`` / ``local``."""
    if address in ("auto", "local"):
        return None
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError([f"ray.address={address!r} is not host:port, ray://host:port or auto"])
    return host, int(port)


def check_reachable(address: str, timeout_s: float) -> None:
    """Fail within ``timeout_s`` (one clear message) when the cluster head at ``address`` takes no connection."""
    endpoint = head_endpoint(address)
    if endpoint is None:
        return
    deadline = time.monotonic() + timeout_s
    error: Exception = TimeoutError()
    while True:
        try:
            with socket.create_connection(endpoint, timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
                return
        except OSError as err:
            error = err
        if time.monotonic() >= deadline:
            break
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    raise ConfigError([f"ray.address={address!r}: no Ray cluster head answers there after {timeout_s:g} s "
                       f"({type(error).__name__}: {error}); is `ray start --head` running on {endpoint[0]}, is port "
                       f"{endpoint[1]} open from here, or unset ray.address / RAY_ADDRESS to start a local cluster "
                       "(ray.connect_timeout_s sets the wait)"])


def stop_ray() -> None:
    """Shut Ray down; for a local cluster, also whatever of its processes is left (the watcher's job)."""
    import ray  # deferred: Ray, only when a run uses it

    if ray.is_initialized():
        ray.shutdown()
    _finish_reaper()


def _finish_reaper() -> None:
    global _reaper
    if _reaper is not None:
        _reaper.finish()
        _reaper = None
