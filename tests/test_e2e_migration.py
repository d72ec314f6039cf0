"""End to end: two real `sevmigd serve` daemons, real TCP on loopback, the CLI as a user runs it.

Rules for this file: loopback and port 0 only (daemons via sevmigd/testing/daemons.py, the proxy binds
127.0.0.1:0); every wait has a deadline (`fail_after`, subprocess timeouts, `wait_for_log` deadlines); no
sleep is used to wait for something: log lines, process exits and proxy events are. Guests are small
(16-64 MiB) so the file stays fast. The frame-aware proxy below is the one place that tampers with
traffic; it knows only the framing (4-byte length + msgpack array whose first element is the type).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import msgpack
import pytest
import trio

from sevmigd.testing.frames import pop_frames
from sevmigd.wire.messages import MsgType

pytestmark = pytest.mark.slow

MAC_TAIL = 34  # c4 20 + HMAC-SHA256: every authenticated frame ends with it
CTL_TIMEOUT = 120


def ctl_json(d, *argv):
    res = d.ctl(*argv, "--json", timeout=CTL_TIMEOUT)
    assert res.returncode == 0, f"ctl {argv} -> {res.returncode}\n{res.stdout}{res.stderr}\n{d.output()[-4000:]}"
    return json.loads(res.stdout)


def launch(d, name, memory, *extra):
    return ctl_json(d, "launch", name, "--memory", memory, *extra)


def guest_names(d):
    return {g["name"]: g["state"] for g in ctl_json(d, "list")}


def assert_still_running_here(src, dst, name):
    st = ctl_json(src, "status", name)
    assert st["state"] == "running", st
    assert st["sev_state"] == "RUNNING", st
    v = ctl_json(src, "verify", name)
    assert v["ok"] and v["mismatch_count"] == 0, v
    assert name not in guest_names(dst)


def popen_ctl(d, *argv):
    cmd = [sys.executable, "-m", "sevmigd", "ctl", "--control", d.control, *map(str, argv)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


# --------------------------------------------------------------------------------------- the proxy


def pages_frame_has_private(frame: bytes) -> bool:
    """True when a Pages frame carries at least one private page (so its tail before the MAC is enc_data)."""
    u = msgpack.Unpacker(raw=False)
    u.feed(frame[4:])
    u.read_array_header()
    u.unpack()  # type
    u.unpack()  # seq
    u.unpack()  # round
    return len(u.unpack()) > 0  # enc_pfns column (8 bytes per page)


def tls_terminating(src, dst):
    """(server_ctx, client_ctx) for a proxy that holds both hosts' TLS keys: it answers the source as the
    destination and connects to the destination as the source (mutual TLS is the default), so it sees and
    can change the frames inside, and each daemon still sees the other's platform-named certificate."""
    from sevmigd import store
    from sevmigd.daemon import tls
    return (tls.server_context(store.tls_paths(dst.state_dir)), tls.client_context(store.tls_paths(src.state_dir)))


class FrameProxy:
    """TCP proxy 127.0.0.1:0 -> target, frame by frame. `hook(direction, mtype, frame)` returns the bytes to
    forward (maybe changed), or None to cut both connections there. Everything forwarded is captured per
    direction ("s2d", "d2s"). `tls`: see `tls_terminating` (None: a plaintext proxy)."""

    def __init__(self, target_host, target_port, hook=None, *, tls=None):
        self.target = (target_host, target_port)
        self.tls = tls
        self.hook = hook or (lambda d, t, f: f)
        self.captured = {"s2d": bytearray(), "d2s": bytearray()}
        self.seen: list[tuple[str, int]] = []
        self.port = None

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client):
        upstream = await trio.open_tcp_stream(*self.target)
        if self.tls is not None:
            client = trio.SSLStream(client, self.tls[0], server_side=True)
            upstream = trio.SSLStream(upstream, self.tls[1], server_hostname=None)
            try:
                async with trio.open_nursery() as n:
                    n.start_soon(client.do_handshake)
                    n.start_soon(upstream.do_handshake)
            except BaseException:
                await trio.aclose_forcefully(client)
                await trio.aclose_forcefully(upstream)
                raise
        async with client, upstream, trio.open_nursery() as n:
            n.start_soon(self._pump, client, upstream, "s2d", n.cancel_scope)
            n.start_soon(self._pump, upstream, client, "d2s", n.cancel_scope)

    async def _pump(self, rx, tx, direction, scope):
        buf = bytearray()
        try:
            while True:
                data = await rx.receive_some(1 << 20)
                if not data:
                    break
                buf += data
                for frame, mtype in pop_frames(buf):
                    self.seen.append((direction, mtype))
                    out = self.hook(direction, mtype, frame)
                    if out is None:  # cut: drop this frame and close both connections
                        scope.cancel()
                        return
                    self.captured[direction] += out
                    await tx.send_all(out)
            if hasattr(tx, "send_eof"):
                await tx.send_eof()
            else:  # TLS has no half-close
                await tx.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            scope.cancel()


# --------------------------------------------------------------------------------------- the tests


def test_live_guest_migrates_and_verifies(daemons):  # noqa: F811
    a, b = daemons(), daemons()
    launch(a, "web", "48M", "--dirty-rate", "8", "--shared-fraction", "0.25", "--flip-rate", "10", "--seed", "3")
    stats = ctl_json(a, "migrate", "web", "--to", b.address)
    assert stats["status"] == "completed"
    assert stats["role"] == "source" and stats["error"] is None
    assert stats["round"] >= 2  # at least one pre-copy round and the stop-and-copy
    assert stats["private_pages"] > 0 and stats["shared_pages"] > 0
    assert stats["downtime_ms"] is not None and stats["downtime_ms"] < stats["total_time_ms"]
    v = ctl_json(b, "verify", "web")
    assert v["ok"] and v["mismatch_count"] == 0 and v["pages_checked"] > 0
    assert guest_names(a) == {"web": "migrated"}
    st = ctl_json(b, "status", "web")
    assert st["state"] == "running" and st["sev_state"] == "RUNNING"
    # the source's copy is gone from its PSP, the destination's log has the one summary line
    assert ctl_json(a, "status", "web")["sev_state"] == "UNINIT"
    done = b.wait_for_log("incoming_completed")
    assert done["guest"] == "web" and done["migration_id"] == stats["migration_id"]
    # and the plain CLI output is one readable line
    launch(a, "small", "16M")
    res = a.ctl("migrate", "small", "--to", b.address, timeout=CTL_TIMEOUT)
    assert res.returncode == 0, res.stderr
    assert "small: migration completed in" in res.stdout


def test_a_to_b_to_a(daemons):  # noqa: F811
    a, b = daemons(), daemons()
    launch(a, "g", "32M", "--dirty-rate", "4", "--shared-fraction", "0.2", "--flip-rate", "2")
    assert ctl_json(a, "migrate", "g", "--to", b.address)["status"] == "completed"
    assert ctl_json(b, "verify", "g")["ok"]
    assert ctl_json(b, "migrate", "g", "--to", a.address)["status"] == "completed"
    v = ctl_json(a, "verify", "g")
    assert v["ok"] and v["mismatch_count"] == 0
    assert guest_names(a) == {"g": "running"}
    assert guest_names(b) == {"g": "migrated"}


def test_nosend_no_migration_control_and_unreachable_are_refused(daemons):  # noqa: F811
    a, b = daemons(), daemons()
    launch(a, "secret", "16M", "--policy", "0x8")
    launch(a, "oldkernel", "16M", "--no-migration-control")
    for name, word in (("secret", "NOSEND"), ("oldkernel", "MSR_KVM_MIGRATION_CONTROL")):
        res = a.ctl("migrate", name, "--to", b.address, timeout=CTL_TIMEOUT)
        assert res.returncode == 1, res.stdout + res.stderr
        assert word in res.stderr
        assert_still_running_here(a, b, name)
    # an unreachable destination: refused at once, guest untouched
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    res = a.ctl("migrate", "secret", "--to", f"127.0.0.1:{dead_port}", timeout=CTL_TIMEOUT)
    assert res.returncode == 1
    launch(a, "ok", "16M")
    res = a.ctl("migrate", "ok", "--to", f"127.0.0.1:{dead_port}", timeout=CTL_TIMEOUT)
    assert res.returncode == 1 and "unreachable" in res.stderr, res.stderr
    assert_still_running_here(a, b, "ok")
    # refused before any connection: the destination never heard of them
    assert not [line for line in b.logs if str(line.get("event", "")).startswith("incoming")]


def test_cancel_mid_migration(daemons):  # noqa: F811
    a, b = daemons(), daemons()
    launch(a, "g", "64M", "--dirty-rate", "4")
    proc = popen_ctl(a, "migrate", "g", "--to", b.address, "--max-bandwidth", "8")
    try:
        b.wait_for_log("incoming_accepted")
        ctl_json(a, "status", "g")  # the daemon keeps answering during the migration
        res = a.ctl("cancel", "g", timeout=CTL_TIMEOUT)
        assert res.returncode == 0, res.stderr
        out, err = proc.communicate(timeout=CTL_TIMEOUT)
    finally:
        proc.kill()
    assert proc.returncode == 1, out + err
    assert "cancelled by the operator" in err
    assert_still_running_here(a, b, "g")
    st = ctl_json(a, "status", "g")
    assert st["migration"]["status"] == "cancelled"
    failed = b.wait_for_log("incoming_failed")
    assert failed["code"] == "CANCELLED"


def test_kill_destination_mid_migration_keeps_guest_on_source(daemons):  # noqa: F811
    a, b = daemons(), daemons()
    launch(a, "g", "64M", "--dirty-rate", "4", "--shared-fraction", "0.1")
    proc = popen_ctl(a, "migrate", "g", "--to", b.address, "--max-bandwidth", "16")
    try:
        b.wait_for_log("incoming_accepted")
        os.kill(b.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=CTL_TIMEOUT)
    finally:
        proc.kill()
    assert proc.returncode == 1, out + err
    st = ctl_json(a, "status", "g")
    assert st["state"] == "running" and st["sev_state"] == "RUNNING"
    assert st["migration"]["status"] == "failed"
    v = ctl_json(a, "verify", "g")
    assert v["ok"] and v["mismatch_count"] == 0


async def test_flipped_ciphertext_byte_is_caught_by_the_psp(daemons):  # noqa: F811
    a, b = daemons(), daemons()
    launch(a, "g", "16M", "--dirty-rate", "2")
    flipped = []

    def hook(direction, mtype, frame):
        if direction == "s2d" and mtype == MsgType.PAGES and not flipped and pages_frame_has_private(frame):
            b2 = bytearray(frame)
            b2[-MAC_TAIL - 1000] ^= 0x40  # inside enc_data: the last field before the MAC
            flipped.append(True)
            return bytes(b2)
        return frame

    proxy = FrameProxy(b.host, b.port, hook, tls=tls_terminating(a, b))
    with trio.fail_after(CTL_TIMEOUT):
        async with trio.open_nursery() as n:
            port = await n.start(proxy.serve)
            res = await a.actl("migrate", "g", "--to", f"127.0.0.1:{port}", timeout=CTL_TIMEOUT)
            n.cancel_scope.cancel()
    assert flipped
    assert res.returncode == 1, res.stdout + res.stderr
    assert "RECEIVE_UPDATE_DATA failed: BAD_MEASUREMENT (0x0b)" in res.stderr
    assert_still_running_here(a, b, "g")
    assert ctl_json(a, "status", "g")["migration"]["error_code"] == "FIRMWARE_ERROR"


async def test_no_private_plaintext_on_the_wire(daemons):  # noqa: F811
    a, b = daemons(), daemons()
    launch(a, "g", "16M", "--shared-fraction", "0.25", "--dirty-rate", "1")
    private_canary = os.urandom(32)
    shared_canary = os.urandom(32)
    ctl_json_ok = a.ctl("guest-write", "g", "0x800000", private_canary.hex(), timeout=CTL_TIMEOUT)
    assert ctl_json_ok.returncode == 0, ctl_json_ok.stderr
    res = a.ctl("guest-write", "g", "0x900000", shared_canary.hex(), "--shared", timeout=CTL_TIMEOUT)
    assert res.returncode == 0, res.stderr
    proxy = FrameProxy(b.host, b.port, tls=tls_terminating(a, b))
    with trio.fail_after(CTL_TIMEOUT):
        async with trio.open_nursery() as n:
            port = await n.start(proxy.serve)
            res = await a.actl("migrate", "g", "--to", f"127.0.0.1:{port}", timeout=CTL_TIMEOUT)
            n.cancel_scope.cancel()
    assert res.returncode == 0, res.stderr
    wire = bytes(proxy.captured["s2d"]) + bytes(proxy.captured["d2s"])
    assert len(wire) > 16 << 20
    # The (TLS-terminating) capture sees page contents: shared pages travel in the clear inside the channel
    assert shared_canary in wire
    assert private_canary not in wire     # ... and a private page's plaintext never does
    got = b.ctl("guest-read", "g", "0x800000", "32", timeout=CTL_TIMEOUT)
    assert got.returncode == 0, got.stderr
    assert private_canary.hex() in got.stdout
    assert ctl_json(b, "verify", "g")["ok"]


def test_sev_es_guest_migrates_its_vmsa(daemons):  # noqa: F811
    a, b = daemons(), daemons()
    launch(a, "es", "16M", "--policy", "0x4", "--dirty-rate", "2")
    stats = ctl_json(a, "migrate", "es", "--to", b.address)
    assert stats["status"] == "completed"
    st = ctl_json(b, "status", "es")
    assert st["state"] == "running" and st["policy"] == "0x4" and st["sev_state"] == "RUNNING"
    v = ctl_json(b, "verify", "es")
    assert v["ok"] and v["mismatch_count"] == 0
    # and back: the VMSA the destination now holds migrates again
    assert ctl_json(b, "migrate", "es", "--to", a.address)["status"] == "completed"
    assert ctl_json(a, "verify", "es")["ok"]


async def _migrate_through_dropping(a, b, drop, *, until: str):
    """Launch "g" on `a` and migrate it to `b` through a TLS-terminating FrameProxy that eats the frames
    `drop(direction, type)` accepts; returns (the `ctl migrate` result, the proxy) once `a` logged `until`."""
    launch(a, "g", "16M", "--dirty-rate", "2")
    proxy = FrameProxy(b.host, b.port, lambda d, t, f: None if drop(d, t) else f, tls=tls_terminating(a, b))
    mark = len(a.logs)
    with trio.fail_after(CTL_TIMEOUT):
        async with trio.open_nursery() as n:
            port = await n.start(proxy.serve)
            res = await a.actl("migrate", "g", "--to", f"127.0.0.1:{port}", timeout=CTL_TIMEOUT)
            await trio.to_thread.run_sync(lambda: a.wait_for_log(until, start=mark, timeout=CTL_TIMEOUT))
            n.cancel_scope.cancel()
    return res, proxy


async def test_lost_started_is_settled_by_the_settlement_query(daemons):  # noqa: F811
    """"started" never reaches the source: the hand-off is uncertain, the source never resumes by itself,
    and it asks the destination over a new connection (issue 17): the guest runs there, so the source
    releases its copy with no operator command. The state and the stats say how it was settled."""
    a, b = daemons(), daemons()
    res, proxy = await _migrate_through_dropping(a, b, lambda d, t: d == "d2s" and t == MsgType.STARTED,
                                                 until="migration_resolved")
    assert res.returncode == 1
    assert "uncertain" in res.stderr and "settlement query" in res.stderr
    assert ("s2d", MsgType.QUERY) in proxy.seen and ("d2s", MsgType.ANSWER) in proxy.seen
    st = ctl_json(a, "status", "g")
    assert st["state"] == "migrated"
    assert st["migration"]["status"] == "completed"
    assert st["migration"]["settlement"] == "released" and st["migration"]["settled_by"] == "query"
    assert st["migration"]["settle_attempts"] >= 1
    assert guest_names(b) == {"g": "running"}
    assert ctl_json(b, "verify", "g")["ok"]
    assert a.ctl("resolve", "g", "--discard").returncode != 0   # nothing left to resolve
    # and it can come back
    assert ctl_json(b, "migrate", "g", "--to", a.address)["status"] == "completed"
    assert ctl_json(a, "verify", "g")["ok"]


async def test_lost_started_with_an_unreachable_destination_needs_one_resolve(daemons):  # noqa: F811
    """The destination cannot be asked (the path eats the settlement queries): the source keeps the guest
    paused (uncertain) and keeps asking; one `resolve` by the operator settles it, and says so."""
    a, b = daemons(), daemons()
    res, _ = await _migrate_through_dropping(a, b, lambda d, t: t in (MsgType.STARTED, MsgType.QUERY),
                                             until="settle_query_failed")
    assert res.returncode == 1
    assert "uncertain" in res.stderr and "resolve" in res.stderr
    st = ctl_json(a, "status", "g")
    assert st["state"] == "migrating" and st["migration"]["status"] == "uncertain"
    assert st["migration"]["settle_attempts"] >= 1
    assert ctl_json(b, "status", "g")["state"] == "running"
    assert ctl_json(b, "verify", "g")["ok"]
    res = a.ctl("resolve", "g", "--discard", timeout=CTL_TIMEOUT)
    assert res.returncode == 0, res.stderr
    assert guest_names(a) == {"g": "migrated"}
    assert guest_names(b) == {"g": "running"}
    st = ctl_json(a, "status", "g")
    assert st["migration"]["settlement"] == "released" and st["migration"]["settled_by"] == "operator"
    # and it can come back
    assert ctl_json(b, "migrate", "g", "--to", a.address)["status"] == "completed"
    assert ctl_json(a, "verify", "g")["ok"]
