"""Every socket a real online run listens on is on loopback: the roles' rendezvous stores, the gloo
connections, the weight-sync store and groups, a vLLM engine's, and Ray's own (``ss -ltnp`` mid-run)."""

from __future__ import annotations

import re
import shutil

import pytest

LOOPBACK = ("127.0.0.1", "::1", "[::1]", "[::ffff:127.0.0.1]")


def listeners(ss_output: str, pids: set[int]) -> list[tuple[str, int, int]]:
    """(address, port, pid) of the listening TCP sockets of ``pids`` in ``ss -ltnpH`` output."""
    found = []
    for line in ss_output.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        address, _, port = fields[3].rpartition(":")
        for pid in re.findall(r"pid=(\d+)", line):
            if int(pid) in pids:
                found.append((address, int(port), int(pid)))
    return found


@pytest.mark.skipif(shutil.which("ss") is None, reason="ss (iproute2) is not installed")
def test_a_split_actor_run_listens_on_loopback_only(split_tp2_run):
    """conftest's ``split_tp2_run`` (two TP training ranks, one rollout rank sampling with vLLM where it is
    installed, so the engine's sockets too) takes ``ss -ltnpH`` after step 2, with every role, the sync groups
    and Ray's processes up."""
    _, _, seen = split_tp2_run
    sockets = listeners(seen["ss"], seen["pids"])
    assert len({pid for _, _, pid in sockets}) >= 3, sockets  # it saw the run's processes listening
    exposed = [s for s in sockets if s[0] not in LOOPBACK]
    assert not exposed, f"listening beyond loopback: {exposed}"
