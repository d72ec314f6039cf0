"""Two throwaway network namespaces joined by a veth pair, for real kernel network faults.

`with NetPair() as net:` creates namespaces `smg<tag>s` / `smg<tag>d` with addresses 10.231.<k>.1 and
10.231.<k>.2 on a veth pair, loopback up in both, and removes everything on exit, even when the test
fails. Addresses exist only inside these private namespaces: nothing touches the host's own network.
Index 0 is the "s" side, 1 the "d" side (`net.ns[i]`, `net.ip[i]`, `net.ifname[i]`); every fault takes
the side it acts on, because the fault harness migrates in both directions.

Faults the kernel provides here (this kernel has no netem; delay and jitter come from the proxy):
  link_down(i)/link_up(i)        the veth carrier goes away: packets are dropped silently (black hole)
  kill_sockets(i, peer_ip, port) `ss -K`: the kernel destroys matching sockets (ECONNABORTED locally)
  reset_rule(i, port)            nftables `reject with tcp reset` on packets to that port
  loss(i, percent)               nftables random drop of outgoing packets
  rate_limit(i, kbit)            tc tbf on side i's veth (egress)
  clear(i)                       nft flush + tc qdisc del: the network is back
Requires root and iproute2 (+ nftables, tc); `available()` says why not when it cannot run.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess

_counter = itertools.count()


def available() -> str | None:
    """None when the kernel tools can run here; otherwise the reason to skip."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    for tool in ("ip", "nft", "tc", "ss"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (.ci/run installs iproute2 and nftables)"
    probe = f"smgprobe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"cannot create a network namespace: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    r = subprocess.run(["nft", "--version"], capture_output=True, text=True)
    if r.returncode != 0:
        return f"nft does not run: {r.stderr.strip()}"
    return None


def _run(*cmd: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run(list(cmd), capture_output=True, text=True, input=input)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip()}")
    return r


class NetPair:
    def __init__(self):
        k = next(_counter)
        tag = f"{os.getpid() % 100000}{k}"
        self.ns = (f"smg{tag}s", f"smg{tag}d")
        self.ifname = (f"smg{tag}a", f"smg{tag}b")
        octet = (os.getpid() + k) % 250 + 1
        self.ip = (f"10.231.{octet}.1", f"10.231.{octet}.2")
        # compatibility names (source = side 0, destination = side 1)
        self.src_ns, self.dst_ns = self.ns
        self.src_if, self.dst_if = self.ifname
        self.src_ip, self.dst_ip = self.ip

    def __enter__(self) -> "NetPair":
        try:
            for ns in self.ns:
                _run("ip", "netns", "add", ns)
            _run("ip", "link", "add", self.ifname[0], "type", "veth", "peer", "name", self.ifname[1])
            for i in (0, 1):
                _run("ip", "link", "set", self.ifname[i], "netns", self.ns[i])
                _run("ip", "-n", self.ns[i], "addr", "add", f"{self.ip[i]}/24", "dev", self.ifname[i])
                _run("ip", "-n", self.ns[i], "link", "set", "lo", "up")
                _run("ip", "-n", self.ns[i], "link", "set", self.ifname[i], "up")
        except Exception:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        # Deleting a namespace deletes its veth end, which deletes the peer too.
        for ns in self.ns:
            _run("ip", "netns", "del", ns, check=False)

    def exec_prefix(self, side) -> list[str]:
        """Command prefix that runs a program inside side `side` (0/1, or "src"/"dst")."""
        return ["ip", "netns", "exec", self.ns[self._i(side)]]

    @staticmethod
    def _i(side) -> int:
        return {"src": 0, "dst": 1}.get(side, side)

    # -- faults -------------------------------------------------------------------------------------
    def link_down(self, side=0) -> None:
        i = self._i(side)
        _run("ip", "-n", self.ns[i], "link", "set", self.ifname[i], "down")

    def link_up(self, side=0) -> None:
        i = self._i(side)
        _run("ip", "-n", self.ns[i], "link", "set", self.ifname[i], "up")
        # the veth pair only carries traffic when both ends are up
        _run("ip", "-n", self.ns[1 - i], "link", "set", self.ifname[1 - i], "up")

    def kill_sockets(self, side, peer_ip: str, port: int) -> str:
        """Destroy side's TCP sockets to peer_ip:port (ss -K); returns ss's listing of what it killed."""
        return _run("ip", "netns", "exec", self.ns[self._i(side)], "ss", "-K", "-t", "dst",
                    f"{peer_ip}:{port}").stdout

    def _nft(self, side, rule: str) -> None:
        _run("ip", "netns", "exec", self.ns[self._i(side)], "nft", "-f", "-", input=rule)

    def reset_rule(self, side, port: int) -> None:
        """Every TCP packet side sends to `port` is answered locally with a reset."""
        self._nft(side, f"table inet smgfault {{ chain out {{ type filter hook output priority 0; "
                        f"tcp dport {port} reject with tcp reset\n }}\n }}\n")

    def loss(self, side, percent: int) -> None:
        """Drop `percent` % of the packets side sends (uniformly at random)."""
        self._nft(side, f"table inet smgloss {{ chain out {{ type filter hook output priority 0; "
                        f"numgen random mod 100 < {percent} drop\n }}\n }}\n")

    def clear_nft(self, side=0) -> None:
        _run("ip", "netns", "exec", self.ns[self._i(side)], "nft", "flush", "ruleset", check=False)

    def rate_limit(self, side, kbit: int) -> None:
        i = self._i(side)
        _run("ip", "netns", "exec", self.ns[i], "tc", "qdisc", "replace", "dev", self.ifname[i],
             "root", "tbf", "rate", f"{kbit}kbit", "burst", "32kbit", "latency", "400ms")

    def clear_rate(self, side=0) -> None:
        i = self._i(side)
        _run("ip", "netns", "exec", self.ns[i], "tc", "qdisc", "del", "dev", self.ifname[i], "root", check=False)

    def clear(self, side=None) -> None:
        """The network is back on `side` (default both): links up, no nft rules, no qdisc."""
        for i in ((0, 1) if side is None else (self._i(side),)):
            self.clear_nft(i)
            self.clear_rate(i)
            self.link_up(i)


class NetStar:
    """`n` hosts on one switch, each in its own throwaway network namespace (the fleet tests).

    `with NetStar(4) as net:` creates namespaces `smg<tag>h0..h{n-1}`, each with one veth end
    (10.232.<k>.<i+1>/24) whose peer is a port of a bridge in a fifth namespace, `smg<tag>sw`; the bridge
    itself has 10.232.<k>.254 there, so a program run in the switch namespace (a Prometheus server)
    reaches every host. Nothing is created in the host's own network namespace; everything is removed on
    exit. `net.ip[i]`, `net.exec_prefix(i)`, `net.switch_ip`, `net.switch_prefix()`.
    """

    def __init__(self, n: int):
        if not 1 <= n <= 200:
            raise ValueError("1..200 hosts")
        k = next(_counter)
        tag = f"{os.getpid() % 100000}{k}"
        self.ns = tuple(f"smg{tag}h{i}" for i in range(n))
        self.switch = f"smg{tag}sw"
        self.ifname = tuple(f"smg{tag}v{i}" for i in range(n))
        self.port = tuple(f"smg{tag}p{i}" for i in range(n))
        self.bridge = f"smg{tag}br"
        octet = (os.getpid() + k) % 250 + 1
        self.ip = tuple(f"10.232.{octet}.{i + 1}" for i in range(n))
        self.switch_ip = f"10.232.{octet}.254"

    def __enter__(self) -> "NetStar":
        try:
            for ns in (self.switch, *self.ns):
                _run("ip", "netns", "add", ns)
                _run("ip", "-n", ns, "link", "set", "lo", "up")
            sw = ("ip", "-n", self.switch)
            _run(*sw, "link", "add", self.bridge, "type", "bridge")
            _run(*sw, "addr", "add", f"{self.switch_ip}/24", "dev", self.bridge)
            _run(*sw, "link", "set", self.bridge, "up")
            for i, ns in enumerate(self.ns):
                # create the pair inside the switch namespace, then move the host end out
                _run(*sw, "link", "add", self.port[i], "type", "veth", "peer", "name", self.ifname[i])
                _run(*sw, "link", "set", self.ifname[i], "netns", ns)
                _run(*sw, "link", "set", self.port[i], "master", self.bridge)
                _run(*sw, "link", "set", self.port[i], "up")
                _run("ip", "-n", ns, "addr", "add", f"{self.ip[i]}/24", "dev", self.ifname[i])
                _run("ip", "-n", ns, "link", "set", self.ifname[i], "up")
        except Exception:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for ns in (*self.ns, self.switch):
            _run("ip", "netns", "del", ns, check=False)

    def exec_prefix(self, i: int) -> list[str]:
        return ["ip", "netns", "exec", self.ns[i]]

    def switch_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.switch]


def star_available() -> str | None:
    """None when NetStar can run here (root, iproute2, namespaces, bridges); else the reason."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "ip (iproute2) not installed"
    probe = f"smgprobe{os.getpid()}b"
    r = _run("ip", "netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"cannot create a network namespace: {r.stderr.strip()}"
    try:
        r = _run("ip", "-n", probe, "link", "add", "smgprobebr", "type", "bridge", check=False)
        if r.returncode != 0:
            return f"cannot create a bridge: {r.stderr.strip()}"
    finally:
        _run("ip", "netns", "del", probe, check=False)
    return None


__all__ = ["NetPair", "NetStar", "available", "star_available"]
