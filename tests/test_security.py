"""Security of a running daemon: control-socket permissions, hostile network peers, limits, trust,
secrets on disk and in logs. Real `sevmigd serve` subprocesses, real TCP on loopback.

Rules for this file: every daemon is a real subprocess (`python -m sevmigd serve`) with its own state
dir and control socket in tmp dirs; readiness is the daemon's `ready` log line (plus READY=1 on a
NOTIFY_SOCKET the test binds where it asks for notify=True; never a sleep); loopback and port 0 only;
every blocking wait has a timeout; tests that need root (setuid to another user) skip with the reason
otherwise.

Daemons come from the shared harness (tests/conftest.py `daemons`, sevmigd/testing/daemons.py).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest

from sevmigd.daemon.client import ControlError
from sevmigd.migrate.trust import platform_files
from sevmigd.psp.identity import PlatformIdentity
from sevmigd.testing.daemons import BackgroundMigration, DaemonProcess, fleet
from sevmigd.wire import NEED_DATA, AbortCode, Connection, RemoteProtocolError, Role
from sevmigd.wire import messages as m

IO_TIMEOUT = 30
NOBODY = 65534


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user (setuid)")


def _as_user_connect(path: str, uid: int, gid: int, groups: tuple[int, ...] = ()) -> str:
    """Try to connect to the unix socket `path` as uid/gid in a forked child; return 'ok' or the errno name."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop to the user, try, report, exit without running any cleanup
        try:
            os.close(r)
            os.setgroups(list(groups))
            os.setgid(gid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(5)
            try:
                s.connect(path)
                res = "ok"
            except OSError as exc:
                res = __import__("errno").errorcode.get(exc.errno, str(exc.errno))
            os.write(w, res.encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        res = f.read().decode()
    os.waitpid(pid, 0)
    return res


# ------------------------------------------------------------------------------- control socket


@pytest.fixture
def open_dir():
    """A world-traversable directory (0755) so that only the socket's own mode protects it."""
    import tempfile
    d = tempfile.mkdtemp(prefix="sevmigd-sec-")
    os.chmod(d, 0o755)
    yield pathlib.Path(d)
    shutil.rmtree(d, ignore_errors=True)


def test_control_socket_is_0600_and_owner_only(daemons, open_dir):
    d = daemons("host", control=str(open_dir / "control.sock"))
    st = os.stat(d.control)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.geteuid()
    assert d.execute("server-info")["listen"]  # the owner can talk to it


@needs_root
def test_non_owner_cannot_connect_to_control_socket(daemons, open_dir):
    d = daemons("host", control=str(open_dir / "control.sock"))
    assert _as_user_connect(d.control, NOBODY, NOBODY) == "EACCES"
    # The refusal comes from the socket's mode (the directory is open): loosen it and nobody gets in,
    # which shows the check above can fail.
    os.chmod(d.control, 0o666)
    assert _as_user_connect(d.control, NOBODY, NOBODY) == "ok"


@needs_root
def test_control_group_members_can_connect_others_cannot(daemons, open_dir):
    import grp
    group = next((g for g in grp.getgrall() if g.gr_gid not in (0, NOBODY) and g.gr_gid >= 1), None)
    if group is None:
        pytest.skip("no spare group on this system")
    d = daemons("host", control=str(open_dir / "control.sock"), config={"control_group": group.gr_name})
    st = os.stat(d.control)
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == group.gr_gid
    assert _as_user_connect(d.control, NOBODY, NOBODY, (group.gr_gid,)) == "ok"
    assert _as_user_connect(d.control, NOBODY, NOBODY) == "EACCES"


# ---------------------------------------------------------------------------------- state on disk


def _walk(root: pathlib.Path):
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames:
            yield pathlib.Path(dirpath) / n
        for n in filenames:
            yield pathlib.Path(dirpath) / n


def test_self_created_state_is_private(daemons, tmp_path):
    """First start with an empty state dir: every key written 0600 inside 0700 directories."""
    d = daemons("fresh", state_dir=str(tmp_path / "fresh-state"))
    keys = []
    for p in _walk(tmp_path / "fresh-state"):
        st = os.lstat(p)
        if stat.S_ISLNK(st.st_mode):
            continue
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISDIR(st.st_mode):
            assert mode & 0o077 == 0, f"{p} is {mode:04o}"
        elif p.suffix == ".key" or p.name == "key.pem":
            keys.append(p)
            assert mode == 0o600, f"{p} is {mode:04o}"
    assert {p.name for p in keys} >= {"cek.key", "oca.key", "pek.key", "pdh.key", "ark.key", "ask.key",
                                      "tls-ca.key", "key.pem"}  # the TLS CA's key and this host's TLS key
    assert d.execute("server-info")


# --------------------------------------------------------------------------------------- secrets


def _secret_needles(state_dir: pathlib.Path) -> list[str]:
    """Strings that would betray a private key in a log: PEM armour, and every key file's bytes as
    hex and base64 (any 24-char window of them)."""
    import base64
    needles = ["-----BEGIN", "PRIVATE KEY"]
    for p in _walk(state_dir):
        if (p.suffix == ".key" or p.name.endswith("key.pem")) and p.is_file() and not p.is_symlink():
            data = p.read_bytes()
            body = data
            if b"-----BEGIN" in data:  # PEM: the base64 body is what could leak
                body = base64.b64decode(b"".join(l for l in data.splitlines() if not l.startswith(b"-----")))
            needles += [body.hex()[i:i + 32] for i in range(0, max(1, len(body.hex()) - 32), 97)]
            needles += [base64.b64encode(body).decode()[i:i + 24] for i in range(0, max(1, len(body) - 24), 61)]
    return needles


def test_private_keys_never_logged(daemons, tmp_path):
    d = daemons("host", state_dir=str(tmp_path / "keys-state"), notify=True)
    d.execute("server-info")
    mark = len(d.messages)
    d.send_signal(signal.SIGHUP)  # a reload logs the config again
    d.wait_notify(lambda m: m.get("RELOADING") == "1", since=mark)
    d.wait_notify(lambda m: m.get("READY") == "1", since=mark)
    assert d.terminate() == 0
    log = d.output()
    assert "ready" in log  # the log is really there
    needles = _secret_needles(tmp_path / "keys-state")
    assert len(needles) > 10
    leaked = [n for n in needles if n in log]
    assert not leaked, f"key material in the daemon log: {leaked[:3]}"


# ------------------------------------------------------------------------------ migrations helpers


def _code(exc: ControlError) -> str | None:
    """The AbortCode name a failed `migrate` reply carries (error.code)."""
    return (exc.reply.get("error") or {}).get("code")


def _fake_hello(port: int, *, platform: dict, memory_bytes: int = 1 << 20, raw: bytes | None = None,
                policy: int = 0, es: bool = False, tls=None):
    """Play a source: send one Hello (or `raw` bytes) and return the destination's first message
    (Accept / Refuse), or None when it closed the connection without one. `tls`: an ssl client context
    (see `_tls_client`); None = plaintext."""
    conn = Connection(Role.SOURCE)
    raw_sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
    with (tls.wrap_socket(raw_sock) if tls is not None else raw_sock) as s:
        s.sendall(raw if raw is not None else conn.send(m.Hello(
            version=1, features=(), platform=platform, guest_name="intruder", memory_bytes=memory_bytes,
            policy=policy, vcpus=1, es=es, migration_id="0123456789abcdef")))
        ev = NEED_DATA
        while ev is NEED_DATA:
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                return None
            if not data:
                return None
            conn.receive_data(data)
            try:
                ev = conn.next_event()
            except RemoteProtocolError:
                return None
        return ev


def _platform_of(fleet_name: str = "fleet", identity: PlatformIdentity | None = None) -> dict[str, bytes]:
    return platform_files(identity or PlatformIdentity.create(fleet(fleet_name).ca, os.urandom))


def _tls_client(directory: pathlib.Path, identity: PlatformIdentity, fleet_name: str = "fleet"):
    """An ssl client context as a host of `fleet_name` whose TLS certificate names `identity`'s chip (what
    `platform init` issues), trusting that fleet's TLS CA."""
    from sevmigd import store
    from sevmigd.daemon import tls
    from sevmigd.testing.pki import tls_ca_for
    return tls.client_context(store.issue_host_tls(directory, tls_ca_for(fleet(fleet_name).ca), identity))


# --------------------------------------------------------------------------------- trust refusals


@pytest.mark.parametrize("cert,offset,link", [
    (None, 0, None),                    # control: the untampered chain is accepted
    ("pek", 0x414 + 17, "PEK"),         # a flipped bit in the PEK's signature
    ("cek", 0x500, "CEK"),              # ... in the CEK's signature (signed by the ASK)
    ("ask", 100, "ASK"),                # ... in the ASK's key (signed by the ARK)
])
def test_tampered_chain_is_refused_with_the_failing_link(daemons, tmp_path, cert, offset, link):
    d = daemons("dest")
    ident = PlatformIdentity.create(fleet("fleet").ca, os.urandom)
    plat = _platform_of(identity=ident)
    if cert is not None:
        b = bytearray(plat[cert])
        b[offset] ^= 0x01
        plat[cert] = bytes(b)
    # A fleet member (its TLS certificate names its own chip) presenting its chain, tampered or not.
    reply = _fake_hello(d.port, platform=plat, tls=_tls_client(tmp_path / "tls", ident))
    if cert is None:
        assert isinstance(reply, m.Accept)
        return
    assert isinstance(reply, m.Refuse), reply
    assert reply.code == AbortCode.UNTRUSTED_PLATFORM
    assert "chain rejected" in reply.reason and link in reply.reason
    assert "intruder" not in d.guests()


def test_platform_of_another_fleet_is_refused(daemons):
    """A source whose chain ends in another fleet's ARK: refused by the destination, guest stays home."""
    src = daemons("src", fleet="other", trust=("fleet",))
    dst = daemons("dst", fleet="fleet")  # trusts only its own fleet
    src.execute("launch", name="g1", memory=4 << 20)
    with pytest.raises(ControlError) as ei:
        src.execute("migrate", name="g1", to=dst.address, timeout=60)
    # With mutual TLS (the default) the destination already refuses the other fleet's TLS certificate; the
    # chain check behind it is tested with a fleet TLS member showing a foreign chain (test_drivers).
    assert _code(ei.value) == "UNTRUSTED_PLATFORM" and "does not accept our TLS certificate" in str(ei.value), ei.value
    assert src.guests() == {"g1": "running"}
    assert "g1" not in dst.guests()


def test_source_refuses_a_destination_of_another_fleet(daemons):
    src = daemons("src", fleet="fleet")  # trusts only its own fleet
    dst = daemons("dst", fleet="other", trust=("fleet",))
    src.execute("launch", name="g1", memory=4 << 20)
    with pytest.raises(ControlError) as ei:
        src.execute("migrate", name="g1", to=dst.address, timeout=60)
    assert _code(ei.value) == "UNTRUSTED_PLATFORM" and "certificate verify failed" in str(ei.value), ei.value
    assert src.guests() == {"g1": "running"}
    assert "g1" not in dst.guests()


# ----------------------------------------------------------------------------------------- limits


@pytest.mark.parametrize("policy,es", [(0x4, False), (0x0, True)])
def test_hello_whose_es_flag_contradicts_its_policy_is_refused(daemons, tmp_path, policy, es):
    """A source that announces plain registers for an SEV-ES policy (or VMSAs for a plain one) is refused
    before anything is reserved: the wire then holds VcpuState to the announced kind."""
    d = daemons("dest")
    ident = PlatformIdentity.create(fleet("fleet").ca, os.urandom)
    as_member = _tls_client(tmp_path / "tls", ident)  # a fleet member speaking for its own platform
    reply = _fake_hello(d.port, platform=_platform_of(identity=ident), policy=policy, es=es, tls=as_member)
    assert isinstance(reply, m.Refuse) and reply.code == AbortCode.PROTOCOL_ERROR, reply
    assert "contradicts policy" in reply.reason
    reply = _fake_hello(d.port, platform=_platform_of(identity=ident), policy=policy, es=not es, tls=as_member)
    assert reply.__class__ is m.Accept, reply


def test_oversized_guest_is_refused(daemons, tmp_path):
    src = daemons("src")
    dst = daemons("dst", config={"max_guest_bytes": "4M"})
    src.execute("launch", name="big", memory=8 << 20)
    with pytest.raises(ControlError) as ei:
        src.execute("migrate", name="big", to=dst.address, timeout=60)
    msg = str(ei.value)
    # A refusal (not a protocol abort) that names the setting, the announced size and the limit.
    assert _code(ei.value) == "RESOURCE_LIMIT" and "refused" in msg and "max_guest_bytes" in msg, msg
    assert str(8 << 20) in msg and str(4 << 20) in msg, msg
    assert src.guests() == {"big": "running"}
    assert "big" not in dst.guests()
    # An absurd announced size from a hand-written source is refused the same way, before allocation.
    ident = PlatformIdentity.create(fleet("fleet").ca, os.urandom)
    reply = _fake_hello(dst.port, platform=_platform_of(identity=ident), memory_bytes=1 << 42,
                        tls=_tls_client(tmp_path / "tls", ident))
    assert isinstance(reply, m.Refuse) and reply.code == AbortCode.RESOURCE_LIMIT, reply


def test_silent_connection_is_dropped_at_handshake_timeout(daemons):
    d = daemons("dest", config={"handshake_timeout_s": 1.0, "keepalive_interval_s": 0.2,
                                "peer_timeout_s": 1.0})
    with socket.create_connection(("127.0.0.1", d.port), timeout=IO_TIMEOUT) as s:
        start = time.monotonic()
        received = b""
        try:
            while chunk := s.recv(4096):   # the daemon may say why (an Abort frame) before closing
                received += chunk
        except ConnectionResetError:
            pass
        elapsed = time.monotonic() - start
    # Closed by the daemon (EOF), at its deadline, not by our socket timeout.
    assert 0.5 <= elapsed < IO_TIMEOUT
    assert len(received) < 1024
    assert d.execute("server-info")


def test_flood_and_garbage_do_not_disturb_a_running_migration(daemons):
    """200 idle or garbage-sending connections against the destination while a migration runs there:
    the migration completes, the guest verifies, the daemon still answers, excess connections are shed."""
    src = daemons("src")
    dst = daemons("dst", config={"handshake_timeout_s": 2.0, "max_unauthenticated": 32})
    src.execute("launch", name="g1", memory=32 << 20, dirty_rate=1.0)
    mig = BackgroundMigration(src, "g1", dst.address, max_bandwidth_mib_s=8)  # ~4 s of pre-copy
    mig.wait_moving()
    rng = __import__("random").Random(4446)
    socks = []
    try:
        for i in range(200):
            try:
                s = socket.create_connection(("127.0.0.1", dst.port), timeout=IO_TIMEOUT)
            except OSError:
                continue  # backlog full for a moment: that is shedding too
            socks.append(s)
            try:
                if i % 4 == 1:
                    s.sendall(bytes(rng.getrandbits(8) for _ in range(512)))      # random garbage
                elif i % 4 == 2:
                    s.sendall(b"\xff\xff\xff\xff" + b"A" * 256)                    # a 4 GiB length prefix
                elif i % 4 == 3:
                    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")                 # wrong protocol
            except OSError:
                pass  # already shed by the daemon
        assert dst.execute("server-info")  # the control plane answers during the flood
        assert mig.result is None and mig.error is None, "the flood did not overlap the migration"
        mig.join()
    finally:
        for s in socks:
            s.close()
    assert mig.error is None, mig.error
    assert mig.result["status"] == "completed"
    assert dst.guests() == {"g1": "running"}
    assert dst.execute("verify", name="g1")["ok"] is True
    events = [e.get("event") for e in dst.logs]
    assert "incoming_evicted" in events  # connections beyond the cap evicted the stalest waiting ones


# -------------------------------------------------------------------------------------------- TLS


_TLS_CAS: dict[str, object] = {}


def _reissue_tls(state_dir: pathlib.Path, tls_ca: str, trust: str) -> None:
    """Give the host of `state_dir` a TLS certificate (naming its chip) from TLS CA `tls_ca` instead of its
    fleet's, trusting only TLS CA `trust` (names of throwaway TLS CAs; "fleet" is the shared fleet's)."""
    from sevmigd import store
    from sevmigd.testing.pki import tls_ca_for
    from sevmigd.tlsca import TlsCA, cert_pem
    _TLS_CAS.setdefault("fleet", tls_ca_for(fleet("fleet").ca))
    for n in (tls_ca, trust):
        _TLS_CAS.setdefault(n, TlsCA.create(os.urandom, name=n))
    paths = store.issue_host_tls(state_dir, _TLS_CAS[tls_ca], store.load_platform(state_dir))
    store.write_atomic(paths["ca"], cert_pem(_TLS_CAS[trust].cert))


def test_mutual_tls_migration_and_refusals(daemons, tmp_path):
    from sevmigd.testing.daemons import make_state_dir
    src = daemons("src")  # mutual TLS with the certificates in the state dirs: the default
    dst = daemons("dst", config={"handshake_timeout_s": 2.0})
    assert src.execute("server-info")["tls"] is True
    src.execute("launch", name="g1", memory=4 << 20)
    assert src.execute("migrate", name="g1", to=dst.address, timeout=60)["status"] == "completed"
    assert dst.guests() == {"g1": "running"}

    # A plaintext source gets nothing: no Accept, the connection is closed, the log says why.
    assert _fake_hello(dst.port, platform=_platform_of()) is None

    # A source from another TLS CA that does not trust ours: it refuses the destination itself.
    make_state_dir(tmp_path / "rogue-state")
    _reissue_tls(tmp_path / "rogue-state", "other-tls", trust="other-tls")
    rogue = daemons("rogue", state_dir=str(tmp_path / "rogue-state"))
    rogue.execute("launch", name="g2", memory=4 << 20)
    with pytest.raises(ControlError) as ei:
        rogue.execute("migrate", name="g2", to=dst.address, timeout=60)
    assert _code(ei.value) == "UNTRUSTED_PLATFORM" and "certificate verify failed" in str(ei.value), ei.value.reply
    assert rogue.guests() == {"g2": "running"}

    # A source whose certificate comes from another CA but that trusts ours: the destination refuses it.
    make_state_dir(tmp_path / "sneaky-state")
    _reissue_tls(tmp_path / "sneaky-state", "other-tls", trust="fleet")
    sneaky = daemons("sneaky", state_dir=str(tmp_path / "sneaky-state"))
    sneaky.execute("launch", name="g3", memory=4 << 20)
    with pytest.raises(ControlError):
        sneaky.execute("migrate", name="g3", to=dst.address, timeout=60)
    assert sneaky.guests() == {"g3": "running"}
    assert set(dst.guests()) == {"g1"}
    assert dst.terminate() == 0  # the log is complete once the daemon has exited
    log = dst.output()
    assert "peer is not speaking TLS" in log          # the plaintext source
    assert "certificate verify failed" in log         # the sneaky source

    # Neither daemon logged a private key: platform keys nor TLS keys.
    for d, name in ((src, "src"), (dst, "dst")):
        d.terminate()
        needles = _secret_needles(d.state_dir)  # platform and TLS keys (STATE/tls/key.pem)
        leaked = [n for n in needles if n in d.output()]
        assert not leaked, f"{name}: key material in the log: {leaked[:3]}"
