"""Hosts on one machine: Linux network namespaces on one bridge, each with its own address.

The bridge lives in the services host's namespace, so nothing is added to the machine's own network;
/etc/netns/<ns>/hosts gives every host Kubernetes-style names. Without namespaces (not root, no
iproute2), hosts are distinct 127.0.0.x addresses on this machine's network. See docs/cluster.md.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from imagenet_ray.errors import UserError

SUBNET_PREFIX = "10.100.0"  # /24, private to each cluster's bridge (clusters never see each other)
SERVICES_HOST = "services"
NETNS_ETC = Path("/etc/netns")
NETNS_RUN = Path("/run/netns")
NS_PREFIX = "irc-"  # every namespace we make: irc-<cluster id>-<host>


@dataclass(frozen=True)
class Host:
    """One machine of the local cluster: a name, its namespace (None in 127.0.0.x mode), its address."""

    name: str
    netns: str | None
    address: str

    def exec_prefix(self) -> list[str]:
        """Run a command on this host (`ip netns exec` execs: the pid stays the command's)."""
        return ["ip", "netns", "exec", self.netns] if self.netns else []


def namespaces_unavailable() -> str | None:
    """Why network namespaces cannot be used here, or None when they can."""
    if os.geteuid() != 0:
        return "not running as root"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    probe = f"{NS_PREFIX}probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip() or made.returncode}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise UserError(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")


def netns_name(cluster_id: str, host: str) -> str:
    return f"{NS_PREFIX}{cluster_id}-{host}"


def _hosts_file(entries: dict[str, list[str]]) -> str:
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    lines += [f"{address}\t{' '.join(names)}" for address, names in entries.items()]
    return "\n".join(lines) + "\n"


def create_hosts(cluster_id: str, names: list[str], aliases: dict[str, list[str]]) -> list[Host]:
    """The services host (bridge at .1) plus one namespace per name (.2, .3, ...), joined by veths.

    `aliases`: extra host names per host name (e.g. {"services": ["mlflow", "s3"]}), written to every
    host's /etc/hosts. On any failure everything made so far is removed."""
    all_names = [SERVICES_HOST, *names]
    hosts = [Host(n, netns_name(cluster_id, n), f"{SUBNET_PREFIX}.{i + 1}") for i, n in enumerate(all_names)]
    try:
        for host in hosts:
            _ip("netns", "add", str(host.netns))
            _ip("-n", str(host.netns), "link", "set", "lo", "up")
        services_ns = str(hosts[0].netns)
        _ip("-n", services_ns, "link", "add", "br0", "type", "bridge")
        _ip("-n", services_ns, "addr", "add", f"{hosts[0].address}/24", "dev", "br0")
        _ip("-n", services_ns, "link", "set", "br0", "up")
        for i, host in enumerate(hosts[1:], start=1):
            port = f"p{i}"  # the bridge-side end, inside the services namespace
            _ip(
                "-n", services_ns, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", str(host.netns)
            )
            _ip("-n", services_ns, "link", "set", port, "master", "br0")
            _ip("-n", services_ns, "link", "set", port, "up")
            _ip("-n", str(host.netns), "addr", "add", f"{host.address}/24", "dev", "eth0")
            _ip("-n", str(host.netns), "link", "set", "eth0", "up")
        entries = {h.address: [h.name, *aliases.get(h.name, [])] for h in hosts}
        for host in hosts:
            etc = NETNS_ETC / str(host.netns)
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(_hosts_file(entries))
    except BaseException:
        delete_hosts(hosts)
        raise
    return hosts


def loopback_hosts(names: list[str]) -> list[Host]:
    """The fallback: services on 127.0.0.1, every other host on its own 127.0.0.x."""
    return [Host(n, None, f"127.0.0.{i + 1}") for i, n in enumerate([SERVICES_HOST, *names])]


def pids_in(host: Host) -> list[int]:
    """Every process whose network namespace is this host's (namespaced hosts only)."""
    if not host.netns or not (NETNS_RUN / host.netns).exists():
        return []
    done = subprocess.run(["ip", "netns", "pids", host.netns], capture_output=True, text=True)
    return [int(p) for p in done.stdout.split() if p.isdigit()]


def kill_host_processes(host: Host, grace_s: float = 5.0) -> list[int]:
    """SIGTERM every process on the host, SIGKILL what is left after `grace_s`; returns survivors."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        pids = pids_in(host)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while pids_in(host) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not pids_in(host):
            return []
    return pids_in(host)


def delete_hosts(hosts: list[Host]) -> list[str]:
    """Kill every process on each host, delete its namespace (its veth goes with it) and /etc/netns entry.

    Returns what could not be removed (empty when all is gone)."""
    left: list[str] = []
    for host in reversed(hosts):
        if not host.netns:
            continue
        survivors = kill_host_processes(host, grace_s=3.0)
        if survivors:
            left.append(f"{host.netns}: pids {', '.join(map(str, survivors))}")
        if (NETNS_RUN / host.netns).exists():
            done = subprocess.run(["ip", "netns", "del", host.netns], capture_output=True, text=True)
            if done.returncode != 0:
                left.append(f"{host.netns}: {done.stderr.strip()}")
        shutil.rmtree(NETNS_ETC / host.netns, ignore_errors=True)
    return left


def our_namespaces(cluster_id: str | None = None) -> list[str]:
    """Namespaces this project made (all clusters, or one) that still exist."""
    prefix = NS_PREFIX if cluster_id is None else f"{NS_PREFIX}{cluster_id}-"
    if not NETNS_RUN.is_dir():
        return []
    return sorted(p.name for p in NETNS_RUN.iterdir() if p.name.startswith(prefix))
