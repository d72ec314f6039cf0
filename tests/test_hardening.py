"""Issue 11, attacks 5-13: hostile input to a running daemon (control socket, incoming connections,
files) never takes it down, never loses a guest, never leaks into the logs, never commits memory or
slots it should not.

Real `sevmigd serve` subprocesses (sevmigd.testing.daemons, fixtures in conftest.py), real TCP on
loopback, real Unix sockets.
No sleeps as synchronisation: every wait is on a log line, a reply, an EOF or a progress event, each
with a deadline. Tests that act as another user need root and skip with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest

from sevmigd.daemon.client import ControlError
from test_security_attacks import Peer
from sevmigd.testing.daemons import fleet, make_state_dir, start_daemon

IO_TIMEOUT = 60
NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user (setuid)")
root = pytest.mark.root

# Error classes a hostile request may get; InternalError is not among them.
TYPED = {"ParseError", "InvalidRequest", "CommandNotFound", "InvalidParameter", "GuestNotFound", "GuestExists",
         "InvalidState", "GuestUnavailable", "ResourceLimit", "ShuttingDown", "MigrationFailed", "FirmwareError", "GenericError"}


# --------------------------------------------------------------------------------------- helpers


class RawControl:
    """A raw control connection: write any bytes, read one reply line (None at EOF)."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(IO_TIMEOUT)
        self.sock.connect(path)
        self.buf = b""

    def send(self, data: bytes | dict) -> None:
        if isinstance(data, dict):
            data = json.dumps(data).encode() + b"\n"
        self.sock.sendall(data)

    def reply(self) -> dict | None:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def ask(self, data: bytes | dict) -> dict | None:
        self.send(data)
        while True:
            r = self.reply()
            if r is None or "event" not in r:
                return r

    def close(self) -> None:
        self.sock.close()


def err_class(reply: dict | None) -> str | None:
    return None if reply is None else (reply.get("error") or {}).get("class")


def guests(d) -> dict[str, str]:
    return d.guests()


def launch(d, name: str, memory: str = "4M", **kw) -> dict:
    return d.execute("launch", {"name": name, "memory": memory, **kw})


class FleetMember:
    """A host of the shared fleet as an attacker may be one: a platform identity (public chain trusted
    by every test daemon) and the TLS client identity `platform init` issues for it (mutual TLS is the
    default), so the attacks below reach the Hello checks, deadlines and slots they are about."""

    _tls_dirs: list = []

    def __init__(self):
        import tempfile

        from sevmigd import store
        from sevmigd.daemon import tls
        from sevmigd.migrate.trust import platform_files
        from sevmigd.psp.identity import PlatformIdentity
        from sevmigd.testing.pki import tls_ca_for
        self.identity = PlatformIdentity.create(fleet().ca, os.urandom)
        self.platform = platform_files(self.identity)
        d = tempfile.mkdtemp(prefix="sevmigd-member-")
        FleetMember._tls_dirs.append(d)
        self.tls = tls.client_context(store.issue_host_tls(pathlib.Path(d), tls_ca_for(fleet().ca), self.identity))


_member: FleetMember | None = None


@pytest.fixture(scope="module", autouse=True)
def _remove_member_tls_dirs():
    yield
    import shutil
    for d in FleetMember._tls_dirs:
        shutil.rmtree(d, ignore_errors=True)


def fleet_member() -> FleetMember:
    global _member
    if _member is None:
        _member = FleetMember()
    return _member


class FakeSource(Peer):
    """Plays a source on a real TCP connection (mutual TLS as a fleet member): Hello, then whatever the
    test wants. A scripted `Peer` of the attack tests (tests/test_security_attacks.py)."""

    def __init__(self, port: int, *, name: str = "intruder", memory_bytes: int = 4 << 20, vcpus: int = 1,
                 member: FleetMember | None = None, migration_id: str = "0123456789abcdef"):
        from sevmigd.wire import Role
        from sevmigd.wire import messages as m
        member = member or fleet_member()
        self.m = m
        raw = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
        try:
            super().__init__(member.tls.wrap_socket(raw), Role.SOURCE)
        except BaseException:
            raw.close()
            raise
        self.send(m.Hello(version=1, features=(), platform=member.platform, guest_name=name,
                          memory_bytes=memory_bytes, policy=0, vcpus=vcpus, es=False, migration_id=migration_id))

    def next_message(self, timeout: float = IO_TIMEOUT):
        """The next message from the destination other than Keepalive (None at EOF/reset/protocol error)."""
        self.sock.settimeout(timeout)
        return self.receive()

    def keepalives_until_closed(self, interval: float = 0.2, limit: float = IO_TIMEOUT,
                                since: float | None = None) -> tuple[float, object]:
        """Send a keepalive every `interval` until the destination aborts or closes; returns (seconds
        since `since` (default: now), the last message received: an Abort, or None at a silent close).

        Paced by our own clock through the receive timeout (not a sleep), never by what arrives: the
        destination's keepalives come as often as ours are due, and a receive timeout restarted by each of
        them may never expire, leaving a peer that sends nothing. `longest_keepalive_gap` is the longest
        time between two of ours (a test that needs them to arrive within a window checks it)."""
        from sevmigd.wire import NEED_DATA, ProtocolError
        start = time.monotonic() if since is None else since
        last = None
        due = sent_at = time.monotonic()
        self.longest_keepalive_gap = 0.0
        while (now := time.monotonic()) - start < limit:
            if now >= due:
                try:
                    self.sock.sendall(self.conn.send(self.m.Keepalive()))
                except (OSError, Exception):  # noqa: BLE001 - closed under us: the loop sees EOF next
                    pass
                self.longest_keepalive_gap = max(self.longest_keepalive_gap, now - sent_at)
                sent_at, due = now, now + interval
            self.sock.settimeout(max(due - time.monotonic(), 0.001))
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError:
                break
            if not data:
                break
            try:
                self.conn.receive_data(data)
                while (ev := self.conn.next_event()) is not NEED_DATA:
                    if not isinstance(ev, self.m.Keepalive):
                        last = ev
            except ProtocolError:
                break
            if isinstance(last, self.m.Abort):
                break
        return time.monotonic() - start, last


# ------------------------------------------------------------------------- 5. the control socket


HOSTILE_LINES = [
    b"[" * 100_000,                                           # RecursionError in json.loads before
    b'{"a":' * 5000 + b"1" + b"}" * 5000,                     # deep objects
    b'{"execute": "status", "arguments": {"name": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}}',
    b'{"execute": "launch", "arguments": {"name": "n1", "memory": 1e999}}',
    b'{"execute": "launch", "arguments": {"name": "n1", "memory": -1e999}}',
    b'{"execute": "launch", "arguments": {"name": "n1", "memory": "4M", "dirty_rate": 1e308}}',
    b'{"execute": "launch", "arguments": {"name": "n1", "memory": ' + b"9" * 100_000 + b"}}",
    b'{"execute": "launch", "arguments": {"name": "n1", "memory": -' + b"9" * 5000 + b"}}",
    b'{"execute": "guest-read", "arguments": {"name": "g1", "gpa": 0.' + b"1" * 5000 + b', "length": 1}}',
    b'{"execute": "status", "arguments": {"name": NaN}}',
    b'{"execute": "status", "arguments": {"name": Infinity}}',
    b'\xff\xfe\xfd{"execute": "list"}',
    b'{"execute": "status", "arguments": {"name": "\xc3\x28"}}',   # invalid UTF-8 inside a string
    b'{"execute": "status", "arguments": {"name": "\xed\xa0\x80"}}',  # a UTF-8-encoded surrogate
    b'{"execute": "status", "arguments": {"name": "\\ud800"}}',       # a lone surrogate escape
    b'{"execute": "list"}\x00',
    b'\x00\x00\x00\x00',
    b'{"execute": "status", "arguments": {"name": "g\x001"}}',
    b'{"execute": "status", "arguments": {"name": "g\\u00001"}}',
    b"[]", b'"list"', b"42", b"null", b"true", b"{}",
    b'{"execute": 1}', b'{"execute": null}', b'{"execute": ["list"]}', b'{"execute": {"a": 1}}',
    b'{"execute": "list", "arguments": []}', b'{"execute": "list", "arguments": "x"}',
    b'{"execute": "list", "id": {"a": 1}}', b'{"execute": "list", "id": [1]}', b'{"execute": "list", "id": 1e999}',
    b'{"execute": "list", "id": "' + b"x" * 10_000 + b'"}',
    b'{"execute": "list", "extra": 1}',
    b'{"execute": "' + b"v" * 100_000 + b'"}',
    b'{"execute": "launch", "arguments": {"name": "n2", "memory": "4M", "image_b64": "!!!!"}}',
    b'{"execute": "launch", "arguments": {"name": "n2", "memory": "4M", "image_b64": "' + b"A" * ((12 << 20) - 200) + b'"}}',
    b'{"execute": "launch", "arguments": {"name": "n2", "memory": "4M", "image": "/etc/shadow"}}',
    b'{"execute": "guest-write", "arguments": {"name": "g1", "gpa": "0x1000", "data_hex": "zz"}}',
    b'{"execute": "migrate", "arguments": {"name": "g1", "to": "[::1"}}',
    b'{"execute": "migrate", "arguments": {"name": "g1", "to": "127.0.0.1:99999"}}',
]


def test_hostile_control_lines_never_take_the_daemon_down(daemon):
    """Attack 5: one connection sends every hostile line; each gets a typed reply on the same
    connection (no InternalError), and the daemon and its guests are untouched afterwards."""
    launch(daemon, "g1", "4M", dirty_rate=1.0)
    launch(daemon, "g2", "4M")
    c = RawControl(daemon.control)
    try:
        for line in HOSTILE_LINES:
            reply = c.ask(line + b"\n")
            assert reply is not None, f"connection dropped after {line[:60]!r}"
            assert err_class(reply) in TYPED, (line[:80], reply)
            # The reply never echoes the line (it may be huge, or a secret the client mistyped).
            assert len(json.dumps(reply)) < 2000, (line[:80], reply)
        assert c.ask({"execute": "server-info"})["return"]["guests"] == 2
    finally:
        c.close()
    assert daemon.proc.poll() is None
    assert guests(daemon) == {"g1": "running", "g2": "running"}
    assert daemon.execute("verify", {"name": "g1"})["ok"] is True
    assert not [e for e in daemon.logs if e.get("event") == "control_request_failed"]


def test_wrong_types_for_every_verb_field(daemon):
    """Every argument of every verb, given values of every JSON type and hostile strings: typed
    replies only, never InternalError, the daemon still serving and its guest still running."""
    from sevmigd.daemon.control import COMMANDS
    launch(daemon, "g1", "4M")
    pool = [None, True, False, 0, -1, 2 ** 64, -(2 ** 63), 1.5, -0.0, 1e308, "", "x" * 300, "\u202egnp.exe",
            "../../etc/passwd", "4M", "0x1000", "127.0.0.1:1", "zz", [], {}, [1], {"a": "b"}]
    # Valid values for the fields not under test; guest-changing verbs get a guest that does not exist.
    base = {
        "launch": {"memory": "4M"},
        "status": {"name": "nosuch"}, "verify": {"name": "nosuch"}, "stop": {"name": "nosuch"},
        "cancel": {"name": "nosuch"}, "resolve": {"name": "nosuch", "run_here": False},
        "migrate": {"name": "nosuch", "to": "127.0.0.1:1"},
        "guest-write": {"name": "g1", "gpa": "0x2000", "data_hex": "00"},
        "guest-read": {"name": "g1", "gpa": "0x2000", "length": 1},
    }
    c = RawControl(daemon.control)
    n = 0
    try:
        for verb, cmd in COMMANDS.items():
            for field in list(cmd.args) + ["bogus"]:
                for value in pool:
                    args = dict(base.get(verb, {}))
                    if verb == "launch":
                        args["name"] = f"w{n}"
                    args[field] = value
                    reply = c.ask({"execute": verb, "arguments": args, "id": n})
                    n += 1
                    assert reply is not None, (verb, field, value)
                    assert "return" in reply or err_class(reply) in TYPED, (verb, field, value, reply)
                    assert reply.get("id") == n - 1
                    if verb == "launch" and "return" in reply:  # a value that happened to be valid
                        assert c.ask({"execute": "stop", "arguments": {"name": args["name"]}}).get("return")
    finally:
        c.close()
    assert n > 500
    assert daemon.proc.poll() is None
    assert guests(daemon) == {"g1": "running"}
    assert daemon.execute("verify", {"name": "g1"})["ok"] is True


def test_parse_request_bounds():
    from sevmigd.daemon.control import MAX_JSON_CONTAINERS, RequestParseError, parse_request
    assert parse_request(b'{"execute": "migrate", "arguments": {"to": "[::1]:4446"}}')["arguments"]["to"] == "[::1]:4446"
    assert parse_request(b"[" * MAX_JSON_CONTAINERS + b"]" * MAX_JSON_CONTAINERS)  # at the bound: parsed
    for bad, words in [(b"[" * (MAX_JSON_CONTAINERS + 1), "at most"), (b"[1e999]", "out of range"),
                       (b"[" + b"1" * 41 + b"]", "41 digits"), (b"\xff", "UTF-8"), (b'["\x00"]', "control character"),
                       (b"[NaN]", "NaN"), (b"[-Infinity]", "Infinity")]:
        with pytest.raises(RequestParseError, match=words):
            parse_request(bad)


# ----------------------------------------------------------------------------- 12. logs and locals


CANARY = "c4n4ry5ecretZQ"


def test_exception_logs_carry_no_frame_locals():
    """The renderer itself: an exception raised in a frame whose locals hold a secret is logged with
    its traceback (file, line, function, message) and without the locals, in both formats."""
    import io

    import structlog

    from sevmigd.daemon.logging import configure_logging, exception_summary

    def handler(request_line=f'{{"name": "{CANARY}"}}', image=CANARY.encode() * 4):
        raise KeyError("missing")

    for fmt in ("json", "console"):
        out = io.StringIO()
        configure_logging("debug", fmt, stream=out)
        try:
            handler()
        except KeyError as exc:
            structlog.get_logger("sevmigd").error("failed", exc_info=True)
            structlog.get_logger("sevmigd").exception("failed_again")
            structlog.get_logger("sevmigd").error("summary", **exception_summary(exc))
        text = out.getvalue()
        assert "in handler" in text and "KeyError" in text, text
        assert CANARY not in text, text
    configure_logging("info", "json")


def test_failing_requests_leave_no_canary_in_the_daemon_logs(daemon):
    """Attack 12 end to end: failing requests that carry a canary in every argument (an image, a
    payload, names, an address, the verb, the id) at debug level: the canary is in no log line on
    stdout or stderr of the real daemon, including after a failed migration."""
    import base64
    launch(daemon, "g1", "4M")
    hexcanary = CANARY.encode().hex()
    requests = [
        {"execute": "launch", "arguments": {"name": "n1", "memory": "4M", "image_b64":
                                            base64.b64encode(CANARY.encode() * 1000).decode(), "vcpus": 1000}},
        {"execute": "launch", "arguments": {"name": "n1", "memory": "1M", "image_b64":
                                            base64.b64encode(CANARY.encode() * 100000).decode()}},
        {"execute": "guest-write", "arguments": {"name": "g1", "gpa": 1 << 40, "data_hex": hexcanary}},
        {"execute": "guest-write", "arguments": {"name": "nosuch", "gpa": 0, "data_hex": hexcanary}},
        {"execute": "status", "arguments": {"name": CANARY + "/.."}},
        {"execute": CANARY},
        {"execute": "list", "id": CANARY, "arguments": {CANARY: 1}},
        {"execute": "migrate", "arguments": {"name": "g1", "to": CANARY}},  # (a valid HOST:PORT is logged: the peer)
        {"execute": "migrate", "arguments": {"name": "g1", "to": "127.0.0.1:1"}, "id": CANARY},
    ]
    c = RawControl(daemon.control)
    try:
        for req in requests:
            reply = c.ask(req)
            assert err_class(reply) in TYPED, (req, reply)
        c.ask(b'{"execute": "status", "arguments": {"name": "' + CANARY.encode() + b'"' + b"[" * 100 + b"\n")
    finally:
        c.close()
    assert daemon.terminate() == 0
    out = daemon.output()
    assert "control_request" in out  # the requests were logged (debug) ...
    assert CANARY not in out and hexcanary not in out  # ... without their contents


# ------------------------------------------------------------------------------ 6. the name rule


BAD_NAMES = ["../../etc/passwd", "a" * 255, "a" * 65, "evil\u202etxt.exe", "caf\u00e9", "a/b", ".hidden", "-x",
             "has space", "tab\there", "new\nline", "nul\x00byte", "\uff41\uff42", "..", "."]


def test_incoming_guest_names_follow_the_launch_rule(daemon):
    """Attack 6: Hello with a name outside the launch rule is refused (PROTOCOL_ERROR, the rule in the
    reason, the name escaped), nothing is created or reserved; the same names fail at launch too."""
    from sevmigd.wire import AbortCode
    from sevmigd.wire import messages as m
    from sevmigd.wire import LocalProtocolError
    for name in BAD_NAMES:
        try:
            src = FakeSource(daemon.port, name=name)
        except LocalProtocolError:  # control characters: the codec itself refuses them on both ends
            assert not name.isprintable()
        else:
            try:
                reply = src.next_message()
            finally:
                src.close()
            assert isinstance(reply, m.Refuse), (name, reply)
            assert reply.code == AbortCode.PROTOCOL_ERROR and "guest names are 1-64 characters" in reply.reason
            assert "\u202e" not in reply.reason and "\n" not in reply.reason
        with pytest.raises(ControlError) as ei:
            launch(daemon, name, "4M")
        assert ei.value.error_class == "InvalidParameter", (name, ei.value)
    assert guests(daemon) == {}
    assert daemon.execute("server-info")["migrations"] == 0
    # A good name from the same kind of peer is accepted (the rule, not the peer, refused the others).
    src = FakeSource(daemon.port, name="fine-name_1.x")
    try:
        assert isinstance(src.next_message(), m.Accept)
    finally:
        src.close()
    assert "\u202e" not in daemon.output()


# ---------------------------------------------------------------------- 7. deadlines and fair slots


# The deadlines under test are seconds, the peer timeout stays at its default (10 s): these tests are
# about start_timeout_s and stall_timeout_s, and a 1 s peer timeout also dropped the attacker (silently,
# without the Abort the tests read) whenever this process or the daemon was descheduled for a second on
# a loaded machine. The attacker sends keepalives all along (FakeSource.keepalives_until_closed), so a
# daemon that counted them as progress would keep the session to the end of the test's limit.
START_TIMEOUT_S = 5.0   # long enough for a refused migrate on a loaded machine to land inside it
STALL_TIMEOUT_S = 3.0   # the attacker's keepalives (every 0.2 s) must each come well inside it


@pytest.mark.slow
def test_hello_then_only_keepalives_is_dropped_and_the_name_released(daemons):
    """Attack 7a: a peer that sends a good Hello and then only keepalives holds its slot and the guest
    name only until start_timeout_s; then the name is free and a real migration of it completes."""
    from sevmigd.wire import AbortCode
    from sevmigd.wire import messages as m
    src = daemons()
    dst = daemons(config={"start_timeout_s": START_TIMEOUT_S, "keepalive_interval_s": 0.2})
    launch(src, "squat", "4M")
    squatter = FakeSource(dst.port, name="squat")
    held: dict = {}
    try:
        assert isinstance(squatter.next_message(), m.Accept)
        accepted = time.monotonic()
        # The squatter keeps its keepalives going from Accept on, while the real source tries the name.
        t = threading.Thread(target=lambda: held.update(
            zip(("took", "last"), squatter.keepalives_until_closed(interval=0.2, since=accepted))))
        t.start()
        try:
            # While the squatter holds the name, a real migration of it is refused.
            with pytest.raises(ControlError) as ei:
                src.execute("migrate", {"name": "squat", "to": dst.address})
            refused_after = time.monotonic() - accepted
        finally:
            t.join(IO_TIMEOUT + 30)
    finally:
        squatter.close()
    assert ei.value.reply["error"].get("code") == "GUEST_EXISTS", (refused_after, ei.value.reply)
    took, last = held["took"], held["last"]
    assert START_TIMEOUT_S - 1.0 <= took < START_TIMEOUT_S + 25, took
    assert squatter.longest_keepalive_gap < START_TIMEOUT_S / 2, squatter.longest_keepalive_gap
    assert isinstance(last, m.Abort) and last.code == AbortCode.TIMEOUT and "start_timeout_s" in last.reason, last
    assert src.execute("migrate", {"name": "squat", "to": dst.address})["status"] == "completed"
    assert guests(dst) == {"squat": "running"}


def send_real_start(fs: FakeSource, accept, identity) -> None:
    """What a real source does after Accept: SEND_START on its own (emulated) PSP for a launched guest,
    then Start with its PDH and the wrapped session, so the destination's RECEIVE_START succeeds."""
    from sevmigd.guest.vm import GuestConfig, SevVm
    from sevmigd.psp.firmware import Firmware
    fw = Firmware(identity)
    fw.init()
    vm = SevVm.launch(fw, GuestConfig(name="x", memory_bytes=4 << 20), asid=1, rng=os.urandom)
    p = accept.platform
    policy, session = fw.send_start(vm.handle, pdh_cert=p["pdh"], plat_certs=p["pek"] + p["oca"] + p["cek"],
                                    amd_certs=p["ask"] + p["ark"])
    pdh, _ = fw.pdh_cert_export()
    fs.send(fs.m.Start(policy=policy, pdh=pdh, session=session))


def test_keepalives_after_start_do_not_keep_a_session():
    """Attack 7a, after Start: a source that sends a valid Start and then only keepalives is dropped
    at stall_timeout_s with TIMEOUT (default 60 s; 3 s here), and its partial guest is discarded."""
    from sevmigd.wire import AbortCode
    from sevmigd.wire import messages as m
    dst = start_daemon(config={"stall_timeout_s": STALL_TIMEOUT_S, "keepalive_interval_s": 0.2})
    try:
        member = fleet_member()
        fs = FakeSource(dst.port, name="stall", member=member)
        try:
            accept = fs.next_message()
            assert isinstance(accept, m.Accept)
            send_real_start(fs, accept, member.identity)
            took, last = fs.keepalives_until_closed(interval=0.2)
        finally:
            fs.close()
        assert isinstance(last, m.Abort) and last.code == AbortCode.TIMEOUT, last
        assert "stall_timeout_s" in last.reason, last.reason
        # The stall clock starts after RECEIVE_START, which follows our Start: never before it.
        assert STALL_TIMEOUT_S - 0.25 <= took < STALL_TIMEOUT_S + 25, took
        # Kept alive all along: every keepalive well inside the stall window, so only the rule ended it.
        assert fs.longest_keepalive_gap < STALL_TIMEOUT_S / 2, fs.longest_keepalive_gap
        assert dst.wait_for_log("incoming_failed")["code"] == "TIMEOUT"
        assert any(e.get("event") == "incoming_accepted" for e in dst.logs)
        assert guests(dst) == {}
    finally:
        dst.cleanup()


class Flood:
    """Background attackers against a destination: idle connections (never a byte) and squatters
    (good Hello, then keepalives, reconnecting when dropped)."""

    def __init__(self, port: int, *, idle: int, squatters: int):
        self.port = port
        self.stop = threading.Event()
        self.idle_socks: list[socket.socket] = []
        self.idle_opened = 0
        self.squats = 0
        self.idle_target = idle
        self.threads = [threading.Thread(target=self._idle, daemon=True)]
        self.threads += [threading.Thread(target=self._squat, args=(i,), daemon=True) for i in range(squatters)]
        self.member = fleet_member()
        for t in self.threads:
            t.start()

    def _idle(self) -> None:
        # Paced at ~200 connections/s: a flood, not a CPU-exhaustion test (an unpaced connect loop on
        # the same 2-core machine starves the daemon of CPU, which no admission policy can prevent).
        while not self.stop.wait(0.005):
            try:
                s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            except OSError:
                continue
            self.idle_socks.append(s)
            self.idle_opened += 1
            if len(self.idle_socks) >= self.idle_target:  # keep the newest open, close the oldest
                self.idle_socks.pop(0).close()

    def _squat(self, i: int) -> None:
        from sevmigd.wire import messages as m
        while not self.stop.is_set():
            try:
                fs = FakeSource(self.port, name=f"squat{i}", member=self.member)
            except OSError:
                continue
            try:
                if isinstance(fs.next_message(timeout=30), m.Accept):
                    self.squats += 1
                    fs.keepalives_until_closed(interval=0.2, limit=5)
            except OSError:
                pass
            finally:
                fs.close()

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)
        for s in self.idle_socks:
            s.close()


@pytest.mark.slow
def test_idle_flood_and_squatters_do_not_starve_a_real_migration(daemons):
    """Attack 7b: while connections that never send a byte keep arriving (far more than
    max_unauthenticated) and squatters Hello-and-keepalive, a real migration is accepted and completes;
    the flood evicted itself, not the real source."""
    src = daemons()
    # start_timeout_s also bounds the real source's Accept -> Start (chain check, SEND_START) and the peer
    # timeout its silences, under the flood on a loaded machine: seconds, not the 1-2 s they were.
    dst = daemons(config={"max_unauthenticated": 8, "max_incoming": 3, "start_timeout_s": START_TIMEOUT_S,
                          "handshake_timeout_s": 30.0, "keepalive_interval_s": 0.2})
    launch(src, "g1", "16M", dirty_rate=1.0)
    flood = Flood(dst.port, idle=40, squatters=2)
    try:
        dst.wait_for_log("incoming_evicted", timeout=IO_TIMEOUT)  # the flood is filling the book
        dst.wait_for_log(lambda e: e.get("event") == "incoming_accepted" and str(e.get("guest", "")).startswith("squat"))
        result = src.execute("migrate", {"name": "g1", "to": dst.address})
        assert flood.idle_opened > 8 and flood.squats >= 2 and not flood.stop.is_set()
    finally:
        flood.close()
    assert result["status"] == "completed"
    assert guests(dst) == {"g1": "running"}
    assert dst.execute("verify", {"name": "g1"})["ok"] is True
    evicted = [e for e in dst.logs if e.get("event") == "incoming_evicted"]
    assert evicted and all(e["idle"] for e in evicted)  # only connections that never sent a byte


# -------------------------------------------------------------------------- 8. bounded commitments


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")  # pragma: no cover


def test_limits_are_refused_at_hello_before_any_allocation(daemon):
    """Attack 8b: a 64 GiB claim (above this host's memory, the default max_incoming_bytes) and
    vcpus=100 are refused with RESOURCE_LIMIT at Hello, no traceback, RSS unchanged."""
    from sevmigd.wire import AbortCode
    from sevmigd.wire import messages as m
    before = _rss(daemon.pid)
    phys = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for kw, words in [({"memory_bytes": 64 << 30}, "max_incoming_bytes"), ({"vcpus": 100}, "vcpus"),
                      ({"memory_bytes": 4096}, "memory_bytes")]:
        if kw.get("memory_bytes", 0) == 64 << 30 and phys >= 64 << 30:
            continue  # this host could hold it: the claim is not an over-commitment here
        fs = FakeSource(daemon.port, name="big", **kw)
        try:
            reply = fs.next_message()
        finally:
            fs.close()
        assert isinstance(reply, m.Refuse) and reply.code == AbortCode.RESOURCE_LIMIT, (kw, reply)
        assert words in reply.reason, reply.reason
    assert _rss(daemon.pid) - before < 64 << 20
    assert "Traceback" not in daemon.output() and "INTERNAL_ERROR" not in daemon.output()
    assert guests(daemon) == {}


def test_total_incoming_budget(daemons):
    """max_incoming_bytes bounds the guest RAM of all migrations being received at once."""
    from sevmigd.wire import AbortCode
    from sevmigd.wire import messages as m
    dst = daemons(config={"max_incoming_bytes": "16M"})
    first = FakeSource(dst.port, name="a", memory_bytes=12 << 20)
    try:
        assert isinstance(first.next_message(), m.Accept)
        second = FakeSource(dst.port, name="b", memory_bytes=8 << 20, migration_id="fedcba9876543210")
        try:
            reply = second.next_message()
        finally:
            second.close()
        assert isinstance(reply, m.Refuse) and reply.code == AbortCode.RESOURCE_LIMIT
        assert "max_incoming_bytes" in reply.reason and str(12 << 20) in reply.reason
    finally:
        first.close()


@pytest.mark.slow
def test_guest_ram_is_committed_as_pages_arrive(daemons):
    """Attack 8a: a 1 GiB guest arriving slowly (1 MiB/s) raises the destination's RSS by what arrived,
    not by the announced size: sampled at every progress event for the first seconds of the
    migration, after the destination created the incoming guest."""
    src = daemons()
    dst = daemons()
    launch(src, "big", "1G")
    base = _rss(dst.pid)
    peak = [0]
    events = [0]
    created = threading.Event()

    def on_event(_name, data):
        if not created.is_set() and "big" in guests(dst):
            created.set()
        if created.is_set():
            peak[0] = max(peak[0], _rss(dst.pid) - base)
            events[0] += 1
            if events[0] == 12:  # ~3 s of progress events after the guest exists there
                src.execute("cancel", {"name": "big"})

    with pytest.raises(ControlError) as ei:
        src.execute("migrate", {"name": "big", "to": dst.address, "max_bandwidth_mib_s": 1.0}, on_event=on_event)
    assert ei.value.reply["error"].get("code") == "CANCELLED", ei.value.reply
    assert created.is_set() and events[0] >= 12
    assert peak[0] < 256 << 20, f"destination RSS grew by {peak[0] >> 20} MiB for a 1 GiB guest at 1 MiB/s"
    assert guests(src) == {"big": "running"}


# ------------------------------------------------------------------------------------ 9. session_id


@pytest.mark.slow
def test_session_id_in_both_logs_status_and_migrate_json(daemons):
    src = daemons()
    dst = daemons()
    launch(src, "g1", "4M")
    res = src.ctl("migrate", "g1", "--to", dst.address, "--json", check=True)
    figures = json.loads(res.stdout)
    sid = figures["session_id"]
    assert re.fullmatch(r"[0-9a-f]{32}", sid)
    assert src.execute("status", {"name": "g1"})["migration"]["session_id"] == sid
    assert dst.execute("status", {"name": "g1"})["migration"]["session_id"] == sid
    st = json.loads(dst.ctl("status", "g1", "--json", check=True).stdout)
    assert st["migration"]["session_id"] == sid
    for d, event in ((src, "migration_completed"), (dst, "incoming_completed")):
        line = d.wait_for_log(event)
        assert line.get("session_id") == sid, line


# ---------------------------------------------------------------------------------------- 10. --image


def test_image_is_read_by_ctl_regular_files_only(daemon, tmp_path):
    img = tmp_path / "img.bin"
    img.write_bytes(bytes(range(256)) * 64)
    out = daemon.ctl("launch", "withimg", "--memory", "4M", "--image", str(img), "--json", check=True)
    assert json.loads(out.stdout)["measurement"]
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path, words in [(fifo, "not a regular file"), ("/dev/zero", "not a regular file"),
                        (tmp_path, "not a regular file"), (tmp_path / "missing", "No such file")]:
        t0 = time.monotonic()
        res = daemon.ctl("launch", "x", "--memory", "4M", "--image", str(path), timeout=IO_TIMEOUT)
        assert res.returncode == 2 and words in res.stderr and str(path) in res.stderr, res
        assert time.monotonic() - t0 < IO_TIMEOUT
    big = tmp_path / "big.bin"
    big.write_bytes(b"\0" * ((4 << 20) + 16))
    res = daemon.ctl("launch", "x", "--memory", "4M", "--image", str(big))
    assert res.returncode == 2 and "at most" in res.stderr
    # The daemon takes bytes only: a path argument is an unknown argument, never opened.
    with pytest.raises(ControlError) as ei:
        daemon.execute("launch", {"name": "x", "memory": "4M", "image": "/etc/shadow"})
    assert ei.value.error_class == "InvalidParameter" and "unknown argument" in ei.value.desc
    assert guests(daemon) == {"withimg": "running"}


def _run_as_nobody(fn) -> tuple[int, str]:
    """Run `fn()` (returns an exit status) in a forked child as nobody:nogroup; its stderr is
    returned. The child runs code already imported here, so the checkout need not be readable by
    nobody."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(r)
            os.dup2(w, 2)
            os.dup2(w, 1)
            sys.stdout = open(1, "w", closefd=False)  # pytest's capture objects are not fds 1/2
            sys.stderr = open(2, "w", closefd=False)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            try:
                rc = int(fn() or 0)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 1
        except BaseException as exc:  # noqa: BLE001
            import traceback
            os.write(2, f"child: {type(exc).__name__}: {exc}\n{traceback.format_exc()}".encode())
            rc = 99
        os._exit(rc)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), b"".join(chunks).decode(errors="replace")


@root
@needs_root
def test_image_is_read_with_the_callers_rights(daemon, tmp_path):
    """Attack 10a: a root-only file given to `ctl launch --image` by a non-root user is refused by
    ctl itself (permission denied), before anything reaches the daemon."""
    from sevmigd.cli import main
    secret = tmp_path / "root-only"
    secret.write_bytes(b"S" * 4096)
    os.chmod(secret, 0o600)
    os.chmod(tmp_path, 0o755)
    rc, err = _run_as_nobody(lambda: main(["ctl", "--control", daemon.control, "launch", "x", "--memory", "4M",
                                           "--image", str(secret)]))
    assert rc == 2 and "Permission denied" in err and str(secret) in err, (rc, err)
    assert guests(daemon) == {}


# --------------------------------------------------------------------------------- 11. identity files


def _identity_file(state_dir: pathlib.Path, name: str) -> pathlib.Path:
    return state_dir / "platform" / name  # through the generation symlink


@pytest.mark.parametrize("kind", ["fifo", "dir", "dev"])
def test_special_identity_file_is_a_one_line_error(tmp_path, kind):
    """Attack 11b: a FIFO (or a directory, or a device) in place of a key: `serve` and `platform show`
    exit promptly with one line naming the file, no traceback, no hang."""
    state = tmp_path / "state"
    make_state_dir(state)
    key = _identity_file(state, "pdh.key").resolve()
    key.unlink()
    if kind == "fifo":
        os.mkfifo(key, 0o600)
    elif kind == "dir":
        key.mkdir(0o700)
    else:
        if os.geteuid() != 0:
            pytest.skip("creating a device node needs root")
        os.mknod(key, 0o600 | stat.S_IFCHR, os.makedev(1, 5))  # /dev/zero
    sock = tmp_path / "c.sock"
    for argv in (["serve", "--state-dir", str(state), "--control", str(sock), "--listen", "127.0.0.1:0"],
                 ["platform", "show", "--state-dir", str(state)]):
        t0 = time.monotonic()
        res = subprocess.run([sys.executable, "-m", "sevmigd", *argv], capture_output=True, text=True,
                             timeout=IO_TIMEOUT, stdin=subprocess.DEVNULL)
        assert time.monotonic() - t0 < IO_TIMEOUT
        assert res.returncode == 1, (argv, res)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
        assert str(key) in lines[0] and "not a regular file" in lines[0], lines[0]


@pytest.fixture
def nobody_dir():
    """A directory owned by nobody that nobody can reach (pytest's tmp dirs are root-only)."""
    import shutil
    import tempfile
    d = pathlib.Path(tempfile.mkdtemp(prefix="sevmigd-nobody-", dir="/tmp"))
    os.chown(d, NOBODY, NOBODY)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@root
@needs_root
def test_unreadable_identity_file_is_a_one_line_error(nobody_dir):
    """Attack 11a: a key file its user cannot read: one line naming the file (no UnboundLocalError),
    from `platform show` and from `serve`."""
    # The children run as nobody, who may not read this Python's installation: what they import lazily
    # is imported here first.
    import pickle  # noqa: F401 - numpy imports it lazily
    import sevmigd.cli.serve  # noqa: F401
    import sevmigd.daemon.server  # noqa: F401
    from sevmigd import store
    from sevmigd.cli import main
    state = nobody_dir / "state"
    make_state_dir(state)
    for p in state.rglob("*"):
        os.lchown(p, NOBODY, NOBODY)
    os.chown(state, NOBODY, NOBODY)
    key = _identity_file(state, "pek.key").resolve()
    os.chown(key, 0, 0)  # root's now, mode 0600: nobody cannot read it
    rc, err = _run_as_nobody(lambda: main(["platform", "show", "--state-dir", str(state)]))
    assert rc == 1 and err.strip().count("\n") == 0 and str(key) in err and "Permission denied" in err, (rc, err)
    rc, err = _run_as_nobody(lambda: main(["serve", "--state-dir", str(state), "--control",
                                           str(nobody_dir / "c.sock"), "--listen", "127.0.0.1:0",
                                           "--log-format", "json"]))
    lines = [ln for ln in err.splitlines() if not ln.startswith("{")]  # stdout's JSON log lines share the pipe
    assert rc == 1 and len(lines) == 1 and str(key) in lines[0] and "Permission denied" in lines[0], (rc, err)
    assert "Traceback" not in err

    def read() -> int:
        try:
            store.read_file(key, secret=True)
        except store.StoreError as exc:
            print(exc, file=sys.stderr)
            return 1
        return 0
    rc, err = _run_as_nobody(read)
    assert rc == 1 and "cannot open: Permission denied" in err, err


def test_read_file_refuses_fifo_without_blocking(tmp_path):
    from sevmigd import store
    fifo = tmp_path / "f"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(store.StoreError, match="not a regular file"):
        store.read_file(fifo, secret=True)
    with pytest.raises(store.StoreError, match="not a regular file"):
        store.read_file(fifo, secret=False)


# ------------------------------------------------------------------------------ 13. workload knobs


@pytest.mark.parametrize("flag,value", [("--dirty-rate", "1e12"), ("--dirty-rate", "nan"), ("--flip-rate", "1e6"),
                                        ("--flip-rate", "-1"), ("--shared-fraction", "2")])
def test_workload_knobs_bounded_at_the_cli(daemon, flag, value):
    res = daemon.ctl("launch", "k", "--memory", "4M", flag, value)
    assert res.returncode == 2 and flag in res.stderr and "Traceback" not in res.stderr, res


REPLY_BOUND_S = 10.0


def test_workload_knobs_bounded_at_the_socket_and_the_socket_stays_responsive(daemon):
    """Attack 13: knobs above their bounds are InvalidParameter naming the bound; guests at the
    heaviest allowed workload leave the control socket answering within a generous bound."""
    from sevmigd.limits import MAX_DIRTY_RATE_MIB_S, MAX_FLIP_RATE
    for key, v in (("dirty_rate", 1e12), ("flip_rate", 1e6), ("dirty_rate", MAX_DIRTY_RATE_MIB_S * 1.01)):
        with pytest.raises(ControlError) as ei:
            launch(daemon, "k", "4M", **{key: v})
        assert ei.value.error_class == "InvalidParameter" and key in ei.value.desc
    for i in range(2):
        launch(daemon, f"hot{i}", "64M", dirty_rate=MAX_DIRTY_RATE_MIB_S, flip_rate=MAX_FLIP_RATE,
                      shared_fraction=0.5, working_set=64)
    worst = 0.0
    for _ in range(30):
        t0 = time.monotonic()
        daemon.execute("server-info")
        worst = max(worst, time.monotonic() - t0)
    # Each reply waits behind both hot guests' vCPU steps (up to VCPU_MAX_SLICE_S of workload each), which
    # preemption stretches: 1.0-1.7 s per reply measured with five other test runs on the 2-core box, so
    # 2 s did not hold beside a benchmark. What this must catch is a socket that waits for the workload
    # to end (a vCPU loop that never yields), not a slow machine.
    assert worst < REPLY_BOUND_S, f"a control reply took {worst:.2f} s under the heaviest allowed workload"
    assert guests(daemon) == {"hot0": "running", "hot1": "running"}
