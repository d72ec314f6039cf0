"""The control socket protocol, in process: a real Daemon (real firmware, real SEV guests) serving a
real Unix socket, driven by raw JSON lines.

Rules: every I/O test runs under `trio.fail_after`; nothing sleeps to synchronise; the socket lives in
a private short /tmp dir (sun_path limit) removed afterwards.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import tempfile

import pytest
import trio

from sevmigd.daemon import control
from sevmigd.daemon.client import ControlClient, ControlError, DaemonNotRunning
from sevmigd.daemon.config import load_config
from sevmigd.daemon.errors import StartupError
from sevmigd.daemon.logging import configure_logging
from sevmigd.daemon.server import Daemon
from sevmigd.psp.identity import FleetCA, PlatformIdentity

TIMEOUT = 30

_identity = None


def identity():
    global _identity
    if _identity is None:
        _identity = PlatformIdentity.create(FleetCA.create(os.urandom, rsa_bits=2048), os.urandom)
    return _identity


@pytest.fixture
def sock_dir():
    d = tempfile.mkdtemp(prefix="sevmigd-ct-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def make_daemon(sock_dir, **overrides):
    cfg = load_config(None, {"state_dir": os.path.join(sock_dir, "state"),
                             "control": os.path.join(sock_dir, "run", "control.sock"),
                             "listen": "127.0.0.1:0",
                             # no migrations here: no TLS identity needed for the injected platform
                             "insecure_plaintext": True,
                             # the control socket's unit tests: guests inside this test process
                             "vmm": "inline", **overrides})
    return Daemon(cfg, identity=identity(), trusted_roots=[])


@pytest.fixture
async def served(nursery, sock_dir):
    d = make_daemon(sock_dir)
    with trio.fail_after(TIMEOUT):
        await nursery.start(d.serve)
    yield d
    d.request_shutdown()
    with trio.fail_after(TIMEOUT):
        await d.wait_stopped()


class Conn:
    """A raw control connection: send objects or bytes, receive one JSON line."""

    def __init__(self, stream):
        self.stream = stream
        self.buf = bytearray()

    async def send(self, obj) -> None:
        data = obj if isinstance(obj, bytes) else json.dumps(obj).encode() + b"\n"
        await self.stream.send_all(data)

    async def recv(self):
        while b"\n" not in self.buf:
            chunk = await self.stream.receive_some(1 << 16)
            if not chunk:
                return None
            self.buf += chunk
        line, _, rest = bytes(self.buf).partition(b"\n")
        self.buf = bytearray(rest)
        return json.loads(line)

    async def call(self, verb, args=None, **extra):
        req = {"execute": verb, **extra}
        if args is not None:
            req["arguments"] = args
        await self.send(req)
        return await self.recv()


async def connect(daemon) -> Conn:
    return Conn(await trio.open_unix_socket(daemon.control_path))


def err_class(reply):
    assert "error" in reply, reply
    return reply["error"]["class"]


async def test_socket_mode_0600_and_parent_dir_0700(served):
    st = os.stat(served.control_path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(served.control_path)).st_mode) == 0o700


async def test_malformed_requests_get_typed_errors_and_the_connection_survives(served):
    with trio.fail_after(TIMEOUT):
        c = await connect(served)
        await c.send(b"{not json\n")
        assert err_class(await c.recv()) == "ParseError"
        await c.send(b"\xff\xfe\n")
        assert err_class(await c.recv()) == "ParseError"
        await c.send(b"[1, 2]\n")
        assert err_class(await c.recv()) == "InvalidRequest"
        await c.send({"arguments": {}})
        assert err_class(await c.recv()) == "InvalidRequest"
        await c.send({"execute": 7})
        assert err_class(await c.recv()) == "InvalidRequest"
        await c.send({"execute": "list", "arguments": [1]})
        assert err_class(await c.recv()) == "InvalidRequest"
        await c.send({"execute": "list", "bogus": 1})
        assert err_class(await c.recv()) == "InvalidRequest"
        r = await c.call("frobnicate")
        assert err_class(r) == "CommandNotFound" and "frobnicate" in r["error"]["desc"]
        # Still serving on the same connection.
        assert (await c.call("list")) == {"return": {"guests": []}}


@pytest.mark.parametrize("verb, args, key", [
    ("status", {}, "name"),
    ("status", {"name": 5}, "name"),
    ("status", {"name": "bad name!"}, "name"),
    ("status", {"name": "g", "extra": 1}, "extra"),
    ("launch", {"name": "g"}, "memory"),
    ("launch", {"name": "g", "memory": "lots"}, "memory"),
    ("launch", {"name": "g", "memory": True}, "memory"),
    ("launch", {"name": "g", "memory": "4M", "shared_fraction": 2}, "shared_fraction"),
    ("launch", {"name": "g", "memory": "4M", "dirty_rate": "fast"}, "dirty_rate"),
    ("launch", {"name": "g", "memory": "4M", "policy": "zz"}, "policy"),
    ("launch", {"name": "g", "memory": "4M", "migration_control": 1}, "migration_control"),
    ("launch", {"name": "g", "memory": "4M", "prefill": "yes"}, "prefill"),
    ("launch", {"name": "g", "memory": "4M", "hypercall": "vmcall"}, "hypercall"),
    ("launch", {"name": "g", "memory": "4M", "hypercall": 12}, "hypercall"),
    ("reboot", {}, "name"),
    ("launch", {"name": "g", "memory": 4097 * 1024}, "memory"),
    ("launch", {"name": "g", "memory": "4M", "image": "relative/path"}, "image"),
    ("launch", {"name": "g", "memory": "4M", "image": "/nonexistent/image"}, "image"),
    ("guest-write", {"name": "g", "gpa": "0x1000", "data_hex": "abc"}, "data_hex"),
    ("guest-write", {"name": "g", "gpa": -1, "data_hex": "ab"}, "gpa"),
    ("guest-read", {"name": "g", "gpa": 0, "length": 0}, "length"),
    ("guest-read", {"name": "g", "gpa": 0, "length": 1 << 30}, "length"),
    ("migrate", {"name": "g"}, "to"),
    ("resolve", {"name": "g", "run_here": "yes"}, "run_here"),
])
async def test_bad_arguments_are_invalid_parameter_naming_the_key(served, verb, args, key):
    with trio.fail_after(TIMEOUT):
        c = await connect(served)
        r = await c.call(verb, args)
        assert err_class(r) == "InvalidParameter", r
        assert r["error"]["desc"].startswith(f"{key}:"), r


async def test_unknown_guest(served):
    with trio.fail_after(TIMEOUT):
        c = await connect(served)
        for verb, args in [("status", {}), ("verify", {}), ("stop", {}), ("cancel", {}), ("reboot", {}),
                           ("guest-read", {"gpa": 0, "length": 1}), ("migrate", {"to": "127.0.0.1:1"})]:
            r = await c.call(verb, {"name": "ghost", **args})
            assert err_class(r) == "GuestNotFound", (verb, r)
            assert "ghost" in r["error"]["desc"]


async def test_request_id_is_echoed(served):
    with trio.fail_after(TIMEOUT):
        c = await connect(served)
        assert (await c.call("list", id="abc"))["id"] == "abc"
        assert (await c.call("nope", id=7))["id"] == 7


async def test_oversize_line_is_refused_and_connection_closed(served):
    with trio.fail_after(TIMEOUT):
        c = await connect(served)
        await c.send(b"x" * (control.MAX_LINE_BYTES + 10))
        r = await c.recv()
        assert err_class(r) == "InvalidRequest" and "longer" in r["error"]["desc"]
        assert await c.recv() is None  # closed
        # The daemon still serves others.
        c2 = await connect(served)
        assert "return" in await c2.call("server-info")


async def test_idle_and_half_sent_clients_do_not_block_others(served):
    with trio.fail_after(TIMEOUT):
        idle = await connect(served)
        await idle.send(b'{"execute": "li')   # never finished
        others = [await connect(served) for _ in range(5)]
        for c in others:
            assert "return" in await c.call("list")
        await idle.stream.aclose()


async def test_guest_lifecycle_over_the_socket(served):
    with trio.fail_after(TIMEOUT):
        c = await connect(served)
        r = await c.call("launch", {"name": "g1", "memory": "4M", "policy": "1", "shared_fraction": 0.25,
                                    "dirty_rate": 1.0, "seed": 3})
        st = r["return"]
        assert set(st) >= {"name", "state", "memory_bytes", "policy", "sev_state", "private_pages",
                           "shared_pages", "launch_digest", "measurement", "migration_control", "migration"}
        assert st["name"] == "g1" and st["state"] == "running" and st["memory_bytes"] == 4 << 20
        assert st["policy"] == "0x1" and st["sev_state"] == "RUNNING"
        assert st["private_pages"] + st["shared_pages"] == 1024 and st["shared_pages"] > 0
        assert len(bytes.fromhex(st["launch_digest"])) == 32 and st["migration_control"] == 1
        assert st["migration"] is None
        assert err_class(await c.call("launch", {"name": "g1", "memory": "4M"})) == "GuestExists"
        lst = (await c.call("list"))["return"]["guests"]
        assert [g["name"] for g in lst] == ["g1"]
        # private and shared round trips through the in-guest agent
        w = await c.call("guest-write", {"name": "g1", "gpa": "0x200000", "data_hex": "00112233"})
        assert w["return"]["length"] == 4
        r = await c.call("guest-read", {"name": "g1", "gpa": 0x200000, "length": 4})
        assert r["return"]["data_hex"] == "00112233"
        await c.call("guest-write", {"name": "g1", "gpa": 0x300000, "data_hex": "cafe", "shared": True})
        r = await c.call("guest-read", {"name": "g1", "gpa": "3145728", "length": 2})
        assert r["return"]["data_hex"] == "cafe"
        r = await c.call("guest-read", {"name": "g1", "gpa": (4 << 20) - 2, "length": 4})
        assert err_class(r) == "InvalidParameter"
        v = (await c.call("verify", {"name": "g1"}))["return"]
        assert v["ok"] is True and v["pages_checked"] > 0 and v["mismatches"] == []
        assert (await c.call("stop", {"name": "g1"}))["return"]["state"] == "stopped"
        assert err_class(await c.call("status", {"name": "g1"})) == "GuestNotFound"
        assert served.guests == {}


async def test_launch_prefill_writes_every_page(served):
    """`prefill: true` reaches GuestConfig: every pool page is written and checked by verify."""
    with trio.fail_after(TIMEOUT):
        c = await connect(served)
        await c.call("launch", {"name": "plain", "memory": "4M"})
        await c.call("launch", {"name": "full", "memory": "4M", "prefill": True})
        plain = (await c.call("verify", {"name": "plain"}))["return"]
        full = (await c.call("verify", {"name": "full"}))["return"]
        assert full["ok"] is True and full["pages_checked"] > plain["pages_checked"] + 900


async def test_vcpu_task_runs_the_guest(served):
    """The daemon's vCPU task calls vm.run(dt): a dirtying workload dirties pages by itself."""
    with trio.fail_after(TIMEOUT):
        c = await connect(served)
        await c.call("launch", {"name": "busy", "memory": "4M", "dirty_rate": 50.0})
        host = served.guests["busy"].vm.host
        host.enable_dirty_log()
        host.get_and_clear_dirty_log()
        while not len(host.get_and_clear_dirty_log()):
            await trio.sleep(0.01)  # polling an effect, bounded by fail_after; not a fixed wait


async def test_server_info(served):
    with trio.fail_after(TIMEOUT):
        c = await connect(served)
        info = (await c.call("server-info"))["return"]
        assert info["listen"] == served.listen_address and info["listen"].startswith("127.0.0.1:")
        assert int(info["listen"].rsplit(":", 1)[1]) > 0
        assert info["platform_id"] == identity().platform_id
        assert info["control"] == served.control_path
        assert info["guests"] == 0 and info["migrations"] == 0


async def test_migrate_refused_for_guest_without_migration_control(served):
    with trio.fail_after(TIMEOUT):
        c = await connect(served)
        await c.call("launch", {"name": "g", "memory": "4M", "migration_control": False})
        r = await c.call("migrate", {"name": "g", "to": served.listen_address})
        assert err_class(r) == "MigrationFailed", r
        assert "MSR_KVM_MIGRATION_CONTROL" in r["error"]["desc"]
        assert served.guests["g"].state == "running"


async def test_second_daemon_on_the_same_socket_is_refused(served, sock_dir):
    other = make_daemon(sock_dir)
    with trio.fail_after(TIMEOUT):
        with pytest.raises(BaseException) as ei:
            async with trio.open_nursery() as n:
                await n.start(other.serve)
    exc = ei.value
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    assert isinstance(exc, StartupError) and "already serving" in str(exc)
    assert os.path.exists(served.control_path)  # the first daemon's socket is untouched


async def test_stale_socket_is_replaced_and_removed_on_shutdown(nursery, sock_dir):
    d = make_daemon(sock_dir)
    os.makedirs(os.path.dirname(d.config.control), mode=0o700)
    import socket
    s = socket.socket(socket.AF_UNIX)
    s.bind(d.config.control)
    s.close()  # a socket file nobody listens on: what a killed daemon leaves behind
    with trio.fail_after(TIMEOUT):
        await nursery.start(d.serve)
        c = await connect(d)
        assert "return" in await c.call("list")
        d.request_shutdown()
        await d.wait_stopped()
    assert not os.path.exists(d.config.control)


async def test_sync_client_errors(served, sock_dir):
    def work():
        with ControlClient(served.control_path, timeout=TIMEOUT) as cl:
            assert cl.execute("list") == {"guests": []}
            with pytest.raises(ControlError) as ei:
                cl.execute("status", {"name": "nope"})
            assert ei.value.error_class == "GuestNotFound"
        with pytest.raises(DaemonNotRunning) as ei:
            ControlClient(os.path.join(sock_dir, "absent.sock")).execute("list")
        assert "no sevmigd daemon listening on" in str(ei.value)

    with trio.fail_after(TIMEOUT):
        await trio.to_thread.run_sync(work)


async def test_guest_data_never_reaches_the_log(served):
    buf = io.StringIO()
    configure_logging("debug", "json", stream=buf)
    try:
        with trio.fail_after(TIMEOUT):
            c = await connect(served)
            await c.call("launch", {"name": "g", "memory": "4M"})
            secret = "5ec12e7da7a0f00d" * 4
            await c.call("guest-write", {"name": "g", "gpa": 0x200000, "data_hex": secret})
            r = await c.call("guest-read", {"name": "g", "gpa": 0x200000, "length": 32})
            assert r["return"]["data_hex"] == secret
    finally:
        configure_logging("info", "json", stream=io.StringIO())
    out = buf.getvalue()
    assert "control_request" in out  # we did log the requests...
    assert secret not in out         # ...but never their payload or result


async def test_control_group_gives_mode_0660_and_the_group(nursery, sock_dir):
    import grp

    group = grp.getgrgid(os.getgid()).gr_name
    d = make_daemon(sock_dir, control_group=group)
    with trio.fail_after(TIMEOUT):
        await nursery.start(d.serve)
        st = os.stat(d.control_path)
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == os.getgid()
        parent = os.stat(os.path.dirname(d.control_path))
        assert stat.S_IMODE(parent.st_mode) == 0o750 and parent.st_gid == os.getgid()
        d.request_shutdown()
        await d.wait_stopped()


async def test_unknown_control_group_is_a_config_error(sock_dir):
    from sevmigd.errors import ConfigError

    d = make_daemon(sock_dir, control_group="no-such-group-sevmigd")
    with trio.fail_after(TIMEOUT):
        with pytest.raises(BaseException) as ei:
            async with trio.open_nursery() as n:
                await n.start(d.serve)
    exc = ei.value
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    assert isinstance(exc, ConfigError) and exc.key == "control_group"


# ------------------------------------------------------------------------------ property: no crash

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70),
                          st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12),
                          st.sampled_from(["0x1000", "4M", "g", "1", "zz", "127.0.0.1:1", "abcd"]))
_json = st.recursive(_json_scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c,
                                                                                          max_size=3), max_leaves=6)
_arg_names = sorted({k for c in control.COMMANDS.values() for k in c.args} | {"bogus"})
_requests = st.fixed_dictionaries(
    {"execute": st.one_of(st.sampled_from(sorted(control.COMMANDS)), _json)},
    optional={"arguments": st.one_of(st.dictionaries(st.sampled_from(_arg_names), _json, max_size=6), _json),
              "id": _json_scalars})


def _offline_daemon():
    """A daemon that is not serving (no nursery): every request must still get a typed reply."""
    from sevmigd.psp.firmware import Firmware

    cfg = load_config(None, {"state_dir": "/nonexistent", "control": "/nonexistent/c.sock",
                             "max_guest_bytes": "2M"})
    fw = Firmware(identity())
    fw.init()
    return Daemon(cfg, identity=identity(), fw=fw, trusted_roots=[])


_OFFLINE = None


@settings(max_examples=int(os.environ.get("SEVMIGD_FUZZ_EXAMPLES", 200)), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(req=_requests)
def test_any_request_gets_a_typed_reply_never_an_internal_error(req):
    global _OFFLINE
    if _OFFLINE is None:
        _OFFLINE = _offline_daemon()
    sent = []

    async def send(obj):
        sent.append(obj)

    line = json.dumps(req).encode()
    reply = trio.run(control.process_line, _OFFLINE, line, send)
    assert ("return" in reply) != ("error" in reply)
    if "error" in reply:
        assert reply["error"]["class"] != "InternalError", reply
    json.dumps(reply, allow_nan=False)
