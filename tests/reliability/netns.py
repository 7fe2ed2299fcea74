"""Network namespaces for the reliability tests: a hub and one namespace per site, each site
joined to the hub by a veth pair, with private addresses that exist only inside them.

    reason = unavailable()          # why not (not root, no `ip netns`), or None
    with Network(["east", "west"]) as net:
        net.command(net.hub, argv); net.link("east").hub_ip; net.set_link("west", up=False)

Names carry a random tag, so runs side by side never meet; everything is deleted on exit, and
at interpreter exit should a caller forget.
"""

from __future__ import annotations

import atexit
import functools
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

# Private addresses, assigned only inside the namespaces made here: site i's pair is
# 10.213.i.1 (hub end) and 10.213.i.2 (site end).
SUBNET = "10.213"
IP = "ip"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([IP, *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {result.stderr.strip()}")
    return result


@functools.cache
def unavailable() -> str | None:
    """Why namespaces cannot be made here (a reason to skip with), or None when they can."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    if shutil.which(IP) is None:
        return "`ip` (iproute2) is not installed"
    probe = f"tspprobe-{secrets.token_hex(4)}"
    try:
        made = _ip("netns", "add", probe, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`ip netns add` cannot run: {exc}"
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


@dataclass(frozen=True)
class Link:
    """A site's namespace and its veth pair to the hub."""

    site: str
    netns: str
    hub_dev: str
    site_dev: str
    hub_ip: str
    site_ip: str


class Network:
    """A hub namespace and a namespace per site, each site joined to the hub by a veth pair."""

    def __init__(self, sites: Sequence[str]) -> None:
        if not 0 < len(sites) < 250 or len(set(sites)) != len(sites):
            raise ValueError(f"give between 1 and 249 distinct site names, not {list(sites)}")
        tag = secrets.token_hex(3)
        self.hub = f"tsp-{tag}-hub"
        self.links = {
            site: Link(
                site=site,
                netns=f"tsp-{tag}-s{i}",
                hub_dev=f"tsp{tag}h{i}",  # interface names: 15 characters at most
                site_dev=f"tsp{tag}s{i}",
                hub_ip=f"{SUBNET}.{i}.1",
                site_ip=f"{SUBNET}.{i}.2",
            )
            for i, site in enumerate(sites)
        }
        self._made: list[str] = []

    def link(self, site: str) -> Link:
        return self.links[site]

    def create(self) -> Network:
        """Make the namespaces and links; on any failure, undo what was made and raise."""
        atexit.register(self.destroy)
        try:
            self._add_netns(self.hub)
            for link in self.links.values():
                self._add_netns(link.netns)
                _ip("link", "add", link.hub_dev, "type", "veth", "peer", "name", link.site_dev)
                _ip("link", "set", link.hub_dev, "netns", self.hub)
                _ip("link", "set", link.site_dev, "netns", link.netns)
                for ns, dev, ip in (
                    (self.hub, link.hub_dev, link.hub_ip),
                    (link.netns, link.site_dev, link.site_ip),
                ):
                    _ip("-n", ns, "addr", "add", f"{ip}/30", "dev", dev)
                    _ip("-n", ns, "link", "set", dev, "up")
        except BaseException:
            self.destroy()
            raise
        return self

    def _add_netns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._made.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def destroy(self) -> None:
        """Delete every namespace made (their veth ends go with them); safe to call twice.
        Processes still running inside keep a namespace alive: stop them first."""
        while self._made:
            _ip("netns", "del", self._made.pop(), check=False)
        atexit.unregister(self.destroy)

    def __enter__(self) -> Network:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def command(self, netns: str, argv: Sequence[str]) -> list[str]:
        """`argv` to run inside `netns` (`ip netns exec` replaces itself: the pid is argv's)."""
        return [IP, "netns", "exec", netns, *argv]

    def set_link(self, site: str, up: bool) -> None:
        """Bring the hub's end of the site's link down (the site is cut off) or up again."""
        _ip("-n", self.hub, "link", "set", self.links[site].hub_dev, "up" if up else "down")
