"""Real kernel network faults under a live migration (issue 6): two daemons in two network namespaces on
a veth pair (sevmigd/testing/netns.py), no proxy: the link goes down (a black hole only keepalives,
TCP_USER_TIMEOUT and the peer timeout can detect), `ss -K` destroys the socket, an nftables rule answers
with TCP resets, nftables drops packets at random, tc tbf collapses the bandwidth. After each fault the
same five invariants as the proxy matrix are checked (sevmigd/testing/invariants.py), the network is
restored, and a fresh migration must succeed.

Needs root, iproute2, nftables and tc (`.ci/run` installs them); skipped with the reason otherwise.
The daemons use peer_timeout_s = 3 s (cells.PEER_TIMEOUT_S); cells alternate direction, so every fault acts on the side that
is the source of that cell.
"""

from __future__ import annotations

import pytest
import trio

from sevmigd.testing import netns
from sevmigd.testing.cells import Harness

REASON = netns.available()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"kernel network faults cannot run here: {REASON}")


@pytest.fixture(scope="module")
def net():
    with netns.NetPair() as n:
        yield n


@pytest.fixture(scope="module")
def harness(net, tmp_path_factory):
    h = Harness.create(tmp_path_factory.mktemp("netns"), hosts=net.ip,
                       netns=(net.exec_prefix(0), net.exec_prefix(1)))
    yield h
    h.close()


def _explain(r) -> str:
    return (f"{r.kind}@{r.phase}: outcome {r.outcome}, error {r.error_code}, detection "
            f"{r.detect_src_s}/{r.detect_dst_s} s\n  " + "\n  ".join(r.failures))


# label -> (fault(net, src, dst, port), when, detection class)
CASES = {
    "link_down": (lambda net, s, d, p: net.link_down(s), "first_round", "stall"),
    "ss_kill": (lambda net, s, d, p: net.kill_sockets(s, net.ip[d], p), "first_round", "immediate"),
    "nft_reset": (lambda net, s, d, p: net.reset_rule(s, p), "first_round", "immediate"),
    "nft_loss": (lambda net, s, d, p: net.loss(s, 10), "first_round", "benign"),
    "tbf_collapse": (lambda net, s, d, p: net.rate_limit(s, 24000), "first_round", "benign"),
    "tbf_severe": (lambda net, s, d, p: net.rate_limit(s, 512), "first_round", "benign"),
    "link_down_at_ready": (lambda net, s, d, p: net.link_down(s), "readiness", "stall"),
    "ss_kill_at_ready": (lambda net, s, d, p: net.kill_sockets(s, net.ip[d], p), "readiness", "immediate"),
}


# Open bugs, kept visible rather than skipped (xfail with the reason). None open now (B3, B5 were fixed).
KNOWN_BUGS: dict[str, str] = {}


@pytest.mark.parametrize("label", [pytest.param(k, marks=pytest.mark.xfail(reason=KNOWN_BUGS[k], strict=False))
                                   if k in KNOWN_BUGS else k for k in CASES])
async def test_kernel_fault_holds_every_invariant(net, harness, label):
    fault, when, cls = CASES[label]
    with trio.fail_after(180):
        r = await harness.run_kernel_cell(label, lambda s, d, p: fault(net, s, d, p), net.clear, when=when,
                                          cls=cls)
    assert r.ok, _explain(r)


def test_netpair_isolated_and_removed():
    """The namespaces exist only inside the context and the host's own interfaces are untouched."""
    import subprocess

    before = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    with netns.NetPair() as n:
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert n.ns[0] in listed and n.ns[1] in listed
        ping = subprocess.run([*n.exec_prefix(0), "ip", "route", "get", n.ip[1]], capture_output=True, text=True)
        assert n.ifname[0] in ping.stdout
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert n.ns[0] not in listed and n.ns[1] not in listed
    assert subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout == before
