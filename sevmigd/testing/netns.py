"""Two throwaway network namespaces joined by a veth pair, for real kernel network faults.

`with NetPair() as net:` creates namespaces `smg<pid>s` / `smg<pid>d` with addresses
10.231.<k>.1 (source side) and 10.231.<k>.2 (destination side) on a veth pair, loopback up in both,
and removes everything on exit, even when the test fails. Addresses exist only inside these private
namespaces: nothing touches the host's own network.

Faults the kernel provides here (this kernel has no netem; delay and jitter come from the proxy):
  link_down()/link_up()     the veth carrier goes away: packets are dropped silently (black hole)
  kill_sockets(port)        `ss -K`: the kernel destroys matching sockets (ECONNABORTED locally)
  reset_rule(port)          nftables `reject with tcp reset` on the destination's port
  loss(percent)             nftables random drop
  rate_limit(kbit)          tc tbf on the source side's veth
Requires root and iproute2 (+ nftables, tc); `available()` says why not when it cannot run.
"""

from __future__ import annotations

import os
import itertools
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
    return None


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(list(cmd), capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip()}")
    return r


class NetPair:
    def __init__(self):
        k = next(_counter)
        tag = f"{os.getpid() % 100000}{k}"
        self.src_ns = f"smg{tag}s"
        self.dst_ns = f"smg{tag}d"
        self.src_if = f"smg{tag}a"
        self.dst_if = f"smg{tag}b"
        octet = (os.getpid() + k) % 250 + 1
        self.src_ip = f"10.231.{octet}.1"
        self.dst_ip = f"10.231.{octet}.2"

    def __enter__(self) -> "NetPair":
        try:
            _run("ip", "netns", "add", self.src_ns)
            _run("ip", "netns", "add", self.dst_ns)
            _run("ip", "link", "add", self.src_if, "type", "veth", "peer", "name", self.dst_if)
            _run("ip", "link", "set", self.src_if, "netns", self.src_ns)
            _run("ip", "link", "set", self.dst_if, "netns", self.dst_ns)
            _run("ip", "-n", self.src_ns, "addr", "add", f"{self.src_ip}/24", "dev", self.src_if)
            _run("ip", "-n", self.dst_ns, "addr", "add", f"{self.dst_ip}/24", "dev", self.dst_if)
            for ns, ifname in ((self.src_ns, self.src_if), (self.dst_ns, self.dst_if)):
                _run("ip", "-n", ns, "link", "set", "lo", "up")
                _run("ip", "-n", ns, "link", "set", ifname, "up")
        except Exception:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        # Deleting a namespace deletes its veth end, which deletes the peer too.
        for ns in (self.src_ns, self.dst_ns):
            _run("ip", "netns", "del", ns, check=False)

    def exec_prefix(self, side: str) -> list[str]:
        """Command prefix that runs a program inside the source or destination namespace."""
        return ["ip", "netns", "exec", self.src_ns if side == "src" else self.dst_ns]

    # -- faults -------------------------------------------------------------------------------------
    def link_down(self) -> None:
        _run("ip", "-n", self.src_ns, "link", "set", self.src_if, "down")

    def link_up(self) -> None:
        _run("ip", "-n", self.src_ns, "link", "set", self.src_if, "up")

    def kill_sockets(self, port: int) -> str:
        """Destroy the source's sockets to the destination's port (ss -K); returns ss's listing."""
        return _run("ip", "netns", "exec", self.src_ns, "ss", "-K", "-t", "dst",
                    f"{self.dst_ip}:{port}").stdout

    def _nft(self, rule: str) -> None:
        r = subprocess.run(["ip", "netns", "exec", self.src_ns, "nft", "-f", "-"], input=rule,
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"nft failed: {r.stderr.strip()}")

    def reset_rule(self, port: int) -> None:
        self._nft(f"table inet smgfault {{ chain out {{ type filter hook output priority 0; "
                  f"tcp dport {port} reject with tcp reset\n }}\n }}\n")

    def loss(self, percent: int) -> None:
        self._nft(f"table inet smgloss {{ chain out {{ type filter hook output priority 0; "
                  f"numgen random mod 100 < {percent} drop\n }}\n }}\n")

    def clear_nft(self) -> None:
        _run("ip", "netns", "exec", self.src_ns, "nft", "flush", "ruleset", check=False)

    def rate_limit(self, kbit: int) -> None:
        _run("ip", "netns", "exec", self.src_ns, "tc", "qdisc", "replace", "dev", self.src_if,
             "root", "tbf", "rate", f"{kbit}kbit", "burst", "32kbit", "latency", "400ms")

    def clear_rate(self) -> None:
        _run("ip", "netns", "exec", self.src_ns, "tc", "qdisc", "del", "dev", self.src_if, "root",
             check=False)
