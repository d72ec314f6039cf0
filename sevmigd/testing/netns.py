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


__all__ = ["NetPair", "available"]
