"""Issue 11, attacks 1-4, played as the attacker would against real `sevmigd serve` daemons on loopback.

Each test is the attack itself (a scripted peer speaking the real wire protocol with real crypto, or a
proxy on the path), followed by what must hold: a guest on exactly one host, no injected guest, the daemon
still serving. Daemons come from the `daemons` fixture (sevmigd.testing.daemons); the scripted peers
here use blocking sockets with deadlines (IO_TIMEOUT) and never sleep to synchronise.

1. untrusted host: a trusted platform's public chain in Hello, its own PDH in Start (Start binding, TLS
   identity);
2. replay of a recorded migration with fresh channel MACs (replay record, also across a restart);
3. a fake destination that knows only the real one's public chain (TLS identity; plaintext: no release);
4. a man in the middle without TLS: forged Started, swallowed Started + forged Abort after Go.
"""

from __future__ import annotations

import os
import pathlib
import socket

import pytest

from sevmigd.wire import CLOSED, NEED_DATA, Connection, RemoteProtocolError, Role
from sevmigd.wire import messages as m
from sevmigd.wire.errors import AbortCode
from sevmigd.testing.daemons import fleet
from test_security import IO_TIMEOUT, _platform_of, _tls_client


def fleet_ca(name: str = "fleet"):
    return fleet(name).ca


def _guests(d) -> dict[str, str]:
    return d.guests()

PLAINTEXT = {"insecure_plaintext": True}


# ------------------------------------------------------------------------------------ scripted peers


class Peer:
    """One side of the migration protocol over a blocking socket (optionally TLS), driven by a test."""

    def __init__(self, sock: socket.socket, role: Role):
        self.sock = sock
        self.sock.settimeout(IO_TIMEOUT)
        self.conn = Connection(role)

    @classmethod
    def connect(cls, port: int, *, tls=None) -> "Peer":
        raw = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
        return cls(tls.wrap_socket(raw) if tls is not None else raw, Role.SOURCE)

    def send(self, msg) -> None:
        self.sock.sendall(self.conn.send(msg))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def receive(self):
        """The next message other than Keepalive; None when the peer closed (or broke the protocol)."""
        while True:
            try:
                ev = self.conn.next_event()
            except RemoteProtocolError:
                return None
            if ev is not NEED_DATA:
                if isinstance(ev, m.Keepalive):
                    continue
                return None if ev is CLOSED else ev
            try:
                data = self.sock.recv(1 << 20)
            except (ConnectionResetError, OSError):
                data = b""
            if not data:
                return None
            try:
                self.conn.receive_data(data)
            except RemoteProtocolError:
                return None

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def _hello(platform: dict, *, name: str = "intruder", memory_bytes: int = 1 << 20, policy: int = 0) -> m.Hello:
    return m.Hello(version=1, features=(), platform=platform, guest_name=name, memory_bytes=memory_bytes,
                   policy=policy, vcpus=1, es=False, migration_id="feedfacefeedface")


class AttackerHost:
    """A host outside the fleet with its own SEV platform (another fleet's chip) and a guest it launched.

    Its PSP wraps sessions to any destination PDH: a real AMD chip accepts every chain under AMD's roots,
    and the emulated one is told to do the same (its fleet root check is what `monkeypatch` lifts on the
    attacker's own machine). So whatever it sends is a complete, valid guest; only the destination's own
    checks can stop it."""

    def __init__(self, monkeypatch, memory_bytes: int = 1 << 20):
        from sevmigd.guest.vm import GuestConfig, SevVm
        from sevmigd.psp import chain
        from sevmigd.psp.firmware import Firmware
        from sevmigd.psp.identity import PlatformIdentity
        monkeypatch.setattr(chain, "validate_platform", lambda *a, **k: None)
        self.identity = PlatformIdentity.create(fleet_ca("evil"), os.urandom)
        self.fw = Firmware(self.identity)
        self.fw.init()
        self.vm = SevVm.launch(self.fw, GuestConfig("intruder", memory_bytes, seed=11), asid=1, rng=os.urandom)
        self.vm.run(0.05)

    def send_guest(self, peer: Peer, hello: m.Hello, accept: m.Accept):
        """Start (SEND_START to the destination's chain, our own PDH), every page, registers, Complete, then
        Go on Ready. Returns the destination's last message (Started when the guest was injected)."""
        import numpy as np
        from sevmigd.migrate.pages import pack_bitmap, split_by_encryption
        p = accept.platform
        policy, session = self.fw.send_start(self.vm.handle, pdh_cert=p["pdh"], plat_certs=p["pek"] + p["oca"] + p["cek"],
                                             amd_certs=p["ask"] + p["ark"])
        peer.send(m.Start(policy=policy, pdh=self.identity.pdh.encode(), session=session))
        host = self.vm.host
        host.pause()
        bits = np.asarray(host.page_enc_bitmap(), dtype=bool).copy()
        enc, shr = split_by_encryption(np.arange(self.vm.npages, dtype=np.int64), bits)
        headers, data = self.fw.send_update_data_batch(self.vm.handle, enc)
        peer.send_raw(peer.conn.send_pages(0, enc, bytes(headers), bytes(data), shr, bytes(host.read_raw_pages(shr))))
        peer.send(m.RoundEnd(round=0, pages=self.vm.npages, remaining=0))
        peer.send(m.Bitmap(npages=self.vm.npages, bits=pack_bitmap(bits)))
        peer.send(m.VcpuState(regs=tuple(host.get_vcpu_state()), vmsa_header=None, vmsa=None))
        peer.send(m.Complete(pages_total=self.vm.npages))
        reply = peer.receive()
        if not isinstance(reply, m.Ready):
            return reply
        peer.send(m.Go())
        return peer.receive()


# ------------------------------------------------------------------------- attack 1: untrusted host


def test_attack1_trusted_chain_in_hello_own_pdh_in_start_plaintext(daemons, monkeypatch):
    """Plaintext destination: nothing but the Start binding stands between the attacker and RECEIVE_START.
    The attacker (a host of another fleet) shows a trusted platform's public chain (`certs export`) and
    then starts with its own PDH and a session wrapped to the destination from it."""
    dst = daemons("dst", config=PLAINTEXT)
    trusted_chain = _platform_of("fleet")                          # public: anyone can export it
    attacker = AttackerHost(monkeypatch)
    peer = Peer.connect(dst.port)
    try:
        hello = _hello(trusted_chain)
        peer.send(hello)
        accept = peer.receive()
        assert isinstance(accept, m.Accept), accept  # the chain is trusted: accepted (so far)
        reply = attacker.send_guest(peer, hello, accept)
    finally:
        peer.close()
    assert isinstance(reply, m.Abort) and reply.code == AbortCode.UNTRUSTED_PLATFORM, reply
    assert "PDH" in reply.reason
    assert "intruder" not in _guests(dst)
    assert dst.execute("server-info")["psp_guests"] == 0  # RECEIVE_START never ran (or was undone)
    assert any(e.get("event") == "migration_failed" or e.get("code") == "UNTRUSTED_PLATFORM"
               for e in dst.logs)


def test_attack1_with_tls_a_fleet_member_cannot_speak_for_another_platform(daemons, tmp_path):
    """TLS destination (the default). A fleet member (its TLS certificate names its own chip) shows another
    platform's chain: refused at Hello, before any firmware command. A host with no fleet certificate
    does not get past TLS at all."""
    from sevmigd.psp.identity import PlatformIdentity
    dst = daemons("dst")
    trusted_chain = _platform_of("fleet")
    member = PlatformIdentity.create(fleet_ca("fleet"), os.urandom)
    peer = Peer.connect(dst.port, tls=_tls_client(tmp_path / "member", member))
    try:
        peer.send(_hello(trusted_chain))
        reply = peer.receive()
    finally:
        peer.close()
    assert isinstance(reply, m.Refuse) and reply.code == AbortCode.UNTRUSTED_PLATFORM, reply
    assert "TLS certificate names" in reply.reason
    # Its own chain is accepted (the refusal above is about the mismatch, not about the member).
    peer = Peer.connect(dst.port, tls=_tls_client(tmp_path / "member", member))
    try:
        peer.send(_hello(_platform_of(identity=member)))
        assert isinstance(peer.receive(), m.Accept)
    finally:
        peer.close()
    # A stranger's TLS certificate (another fleet's TLS CA): no Hello is read at all.
    stranger = PlatformIdentity.create(fleet_ca("evil"), os.urandom)
    with pytest.raises((OSError, ConnectionError)):
        peer = Peer.connect(dst.port, tls=_tls_client(tmp_path / "stranger", stranger, "evil"))
        try:
            peer.send(_hello(trusted_chain))
            assert peer.receive() is None
            raise ConnectionError("closed without a reply")  # TLS 1.3: refused after our handshake
        finally:
            peer.close()
    assert "intruder" not in _guests(dst)
    assert dst.execute("server-info")["psp_guests"] == 0


# ------------------------------------------------------------------------------ attack 2: replay


class ThreadedListener:
    """A TCP listener on 127.0.0.1 (port 0, `port`) whose `_serve()` runs in a thread with blocking sockets,
    for the hosts of an attack; `done` is set by subclasses when they are finished, `close()` stops accepting."""

    def __init__(self):
        import threading
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(IO_TIMEOUT)
        self.port = self.listener.getsockname()[1]
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.listener.close()


class Recorder(ThreadedListener):
    """A TCP proxy on 127.0.0.1 that records what the source sends (threads, blocking sockets). With `tls`
    = (server_ctx, client_ctx) it terminates TLS holding both hosts' keys (a recording made on a host of the
    path: the worst case), so the recording holds the frames themselves."""

    def __init__(self, target_port: int, tls=None):
        self.target = ("127.0.0.1", target_port)
        self.tls = tls
        self.s2d = bytearray()
        super().__init__()

    def _serve(self):
        import threading
        try:
            client, _ = self.listener.accept()
            upstream = socket.create_connection(self.target, timeout=IO_TIMEOUT)
            if self.tls is not None:
                client = self.tls[0].wrap_socket(client, server_side=True)
                upstream = self.tls[1].wrap_socket(upstream)
            for s in (client, upstream):
                s.settimeout(120)
            t = threading.Thread(target=self._pump, args=(upstream, client, None), daemon=True)
            t.start()
            self._pump(client, upstream, self.s2d)
            t.join(120)
        except OSError:
            pass
        finally:
            self.done.set()

    @staticmethod
    def _pump(rx, tx, record):
        try:
            while data := rx.recv(1 << 20):
                if record is not None:
                    record += data
                tx.sendall(data)
        except OSError:
            pass
        for s in (tx, rx):
            try:
                s.close()
            except OSError:
                pass

    def messages(self) -> list[tuple[int, list]]:
        """The recorded source frames as (type, fields) (fields without type, seq and mac)."""
        import msgpack
        from sevmigd.testing.frames import pop_frames
        buf = bytearray(self.s2d)
        out = []
        for frame, mtype in pop_frames(buf):
            body = msgpack.unpackb(frame[4:], raw=False, strict_map_key=False)
            out.append((mtype, body[2:-1]))
        return out


def _replay(port: int, recorded: list[tuple[int, list]], *, guest_name: str, tls=None):
    """The attacker's replay: its own channel handshake (fresh key share, so fresh MACs), then the recorded
    Hello fields (under another guest name: the original runs there now), Start, pages, vCPU state and
    Complete re-sent as they were; Go on Ready. Returns the destination's last message."""
    import numpy as np
    peer = Peer.connect(port, tls=tls)
    try:
        (t0, h), rest = recorded[0], recorded[1:]
        assert t0 == m.MsgType.HELLO
        # magic, version, features, platform, guest_name, memory_bytes, policy, vcpus, es, migration_id, ...
        peer.send(m.Hello(version=h[1], features=tuple(h[2]), platform=h[3], guest_name=guest_name,
                          memory_bytes=h[5], policy=h[6], vcpus=h[7], es=h[8], migration_id="0ddba11"))
        accept = peer.receive()
        if not isinstance(accept, m.Accept):
            return accept
        try:
            for t, f in rest:
                if t == m.MsgType.START:
                    peer.send(m.Start(policy=f[0], pdh=f[1], session=f[2]))
                elif t == m.MsgType.PAGES:
                    col = lambda b: np.frombuffer(b, dtype="<u8")  # noqa: E731
                    peer.send_raw(peer.conn.send_pages(f[0], col(f[1]), f[2], f[5], col(f[3]), f[4]))
                elif t == m.MsgType.ROUND_END:
                    peer.send(m.RoundEnd(round=f[0], pages=f[1], remaining=f[2]))
                elif t == m.MsgType.BITMAP:
                    peer.send(m.Bitmap(npages=f[0], bits=f[1]))
                elif t == m.MsgType.VCPU_STATE:
                    peer.send(m.VcpuState(regs=None if f[0] is None else tuple(f[0]), vmsa_header=f[1], vmsa=f[2]))
                elif t == m.MsgType.COMPLETE:
                    peer.send(m.Complete(pages_total=f[0]))
                    break
        except OSError:
            pass  # the destination refused mid-way: its Abort is what we read next
        reply = peer.receive()
        if isinstance(reply, m.Ready):
            peer.send(m.Go())
            reply = peer.receive()
        return reply
    finally:
        peer.close()


def _restart(d):
    """Stop daemon `d` (SIGTERM) and start it again on the same state dir (a destination restart)."""
    assert d.terminate() == 0
    d.restart()
    return d


def _migrate_recorded(src, dst, tls=None, name: str = "g1") -> list:
    rec = Recorder(dst.port, tls=tls)
    try:
        result = src.execute("migrate", name=name, to=f"127.0.0.1:{rec.port}", timeout=120)
        assert rec.done.wait(IO_TIMEOUT)
    finally:
        rec.close()
    if tls is None:
        # Plaintext: Started is not authenticated, so the source keeps its (paused) copy until the operator
        # checked the destination; here it does and resolves.
        assert result["status"] == "uncertain", result
        assert _guests(dst)[name] == "running"
        src.execute("resolve", name=name, run_here=False)
    else:
        assert result["status"] == "completed", result
    assert _guests(src)[name] == "migrated" and _guests(dst)[name] == "running"
    return rec.messages()


def test_attack2_replayed_migration_is_refused_plaintext_also_after_restart(daemons):
    src = daemons("src", config=PLAINTEXT)
    dst = daemons("dst", config=PLAINTEXT)
    src.execute("launch", name="g1", memory=4 << 20)
    recorded = _migrate_recorded(src, dst)
    assert [t for t, _ in recorded if t == m.MsgType.START]
    reply = _replay(dst.port, recorded, guest_name="g1-clone")
    assert isinstance(reply, m.Abort) and reply.code == AbortCode.REPLAYED_SESSION, reply
    assert set(_guests(dst)) == {"g1"} and dst.execute("server-info")["psp_guests"] == 1
    # The record survives a restart of the destination.
    dst = _restart(dst)  # (the replay record stays)
    reply = _replay(dst.port, recorded, guest_name="g1-clone")
    assert isinstance(reply, m.Abort) and reply.code == AbortCode.REPLAYED_SESSION, reply
    # (g1 outlives the restart in its VMM with vmm = "process", not with "inline"; no clone either way)
    assert set(_guests(dst)) <= {"g1"} and dst.execute("server-info")["psp_guests"] == len(_guests(dst))


def test_attack2_replay_by_a_fleet_member_with_tls_is_refused(daemons, tmp_path):
    """TLS on. The host that sent the guest (holding its own TLS key, so the chip check passes) replays its
    recorded migration: refused by the replay record, also after a destination restart. Another fleet
    member replaying it is refused earlier: its certificate names another chip."""
    from sevmigd import store
    from sevmigd.daemon import tls
    from sevmigd.psp.identity import PlatformIdentity
    src, dst = daemons("src"), daemons("dst")
    src.execute("launch", name="g1", memory=4 << 20)
    as_src = tls.client_context(store.tls_paths(src.state_dir))
    mitm = (tls.server_context(store.tls_paths(dst.state_dir)), as_src)
    recorded = _migrate_recorded(src, dst, tls=mitm)
    reply = _replay(dst.port, recorded, guest_name="g1-clone", tls=as_src)
    assert isinstance(reply, m.Abort) and reply.code == AbortCode.REPLAYED_SESSION, reply
    member = PlatformIdentity.create(fleet_ca("fleet"), os.urandom)
    reply = _replay(dst.port, recorded, guest_name="g1-clone", tls=_tls_client(tmp_path / "m", member))
    assert isinstance(reply, m.Refuse) and reply.code == AbortCode.UNTRUSTED_PLATFORM, reply
    assert set(_guests(dst)) == {"g1"} and dst.execute("server-info")["psp_guests"] == 1
    assert dst.execute("verify", name="g1")["ok"] is True
    dst = _restart(dst)  # (the replay record stays)
    reply = _replay(dst.port, recorded, guest_name="g1-clone", tls=as_src)
    assert isinstance(reply, m.Abort) and reply.code == AbortCode.REPLAYED_SESSION, reply
    # (g1 outlives the restart in its VMM with vmm = "process", not with "inline"; no clone either way)
    assert set(_guests(dst)) <= {"g1"} and dst.execute("server-info")["psp_guests"] == len(_guests(dst))


# ------------------------------------------------------------------- attack 3: a fake destination


class FakeDestination:
    """A listener that knows only the real destination's public chain: it answers Hello with Accept, reads
    whatever comes (ciphertext it cannot open), says Ready and then Started (a thread; optional TLS)."""

    def __init__(self, platform: dict, tls=None):
        import threading
        self.platform = platform
        self.tls = tls
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(IO_TIMEOUT)
        self.port = self.listener.getsockname()[1]
        self.said_started = threading.Event()
        self.got_start = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        try:
            sock, _ = self.listener.accept()
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_side=True)
            peer = Peer(sock, Role.DESTINATION)
            while (msg := peer.receive()) is not None:
                if isinstance(msg, m.Hello):
                    peer.send(m.Accept(version=1, features=(), platform=self.platform))
                elif isinstance(msg, m.Start):
                    self.got_start.set()
                elif isinstance(msg, m.Complete):
                    peer.send(m.Ready())
                elif isinstance(msg, m.Go):
                    peer.send(m.Started())
                    self.said_started.set()
            peer.close()
        except OSError:
            pass

    def close(self):
        self.listener.close()
        self._thread.join(IO_TIMEOUT)


def _server_tls(directory: pathlib.Path, identity, fleet: str = "fleet"):
    """An ssl server context as a host of `fleet` whose certificate names `identity`'s chip."""
    from sevmigd import store
    from sevmigd.daemon import tls
    from sevmigd.testing.pki import tls_ca_for
    return tls.server_context(store.issue_host_tls(directory, tls_ca_for(fleet_ca(fleet)), identity))


def test_attack3_fake_destination_with_tls_gets_nothing(daemons, tmp_path):
    """TLS on (the default). A listener with the real destination's public chain and no fleet certificate
    fails the TLS handshake; a fleet member showing the destination's chain fails the identity check (its
    certificate names its own chip). Both before SEND_START: the guest keeps running, nothing was sent."""
    from sevmigd.psp.identity import PlatformIdentity
    src, dst = daemons("src"), daemons("dst")
    src.execute("launch", name="g1", memory=4 << 20)
    from sevmigd import store
    from sevmigd.migrate.trust import platform_files
    chain = platform_files(store.load_platform(dst.state_dir))   # public: `certs export` gives it to anyone

    fake = FakeDestination(chain)  # plaintext listener, no certificate
    try:
        with pytest.raises(Exception) as ei:
            src.execute("migrate", name="g1", to=f"127.0.0.1:{fake.port}", timeout=60)
        assert "UNTRUSTED_PLATFORM" in str(getattr(ei.value, "reply", ei.value)) or "TLS" in str(ei.value)
    finally:
        fake.close()
    assert not fake.got_start.is_set()

    member = PlatformIdentity.create(fleet_ca("fleet"), os.urandom)
    fake = FakeDestination(chain, tls=_server_tls(tmp_path / "member", member))
    try:
        with pytest.raises(Exception) as ei:
            src.execute("migrate", name="g1", to=f"127.0.0.1:{fake.port}", timeout=60)
        assert "TLS certificate names" in str(ei.value), ei.value
    finally:
        fake.close()
    assert not fake.got_start.is_set()  # refused before SEND_START: no session was wrapped for it
    assert _guests(src) == {"g1": "running"}
    assert src.execute("verify", name="g1")["ok"] is True


def test_attack3_fake_destination_without_tls_cannot_make_the_source_release(daemons):
    """Plaintext: the fake destination gets all the way to Started. The source does not release on an
    unauthenticated word: the migration ends uncertain, the guest stays here (paused) until the operator
    checked the destination; `resolve --run-here` gives it back intact."""
    from sevmigd import store
    from sevmigd.migrate.trust import platform_files
    src, dst = daemons("src", config=PLAINTEXT), daemons("dst", config=PLAINTEXT)
    src.execute("launch", name="g1", memory=4 << 20)
    fake = FakeDestination(platform_files(store.load_platform(dst.state_dir)))
    try:
        result = src.execute("migrate", name="g1", to=f"127.0.0.1:{fake.port}", timeout=60)
    finally:
        fake.close()
    assert fake.said_started.is_set()
    assert result["status"] == "uncertain", result
    assert "resolve" in (result.get("error") or "")
    st = src.execute("status", name="g1")
    assert st["state"] == "migrating" and st["migration"]["status"] == "uncertain"
    assert st["sev_state"] not in (None, "None")  # the firmware context is still there
    src.execute("resolve", name="g1", run_here=True)
    assert _guests(src) == {"g1": "running"}
    assert src.execute("verify", name="g1")["ok"] is True
    assert "g1" not in _guests(dst)


# --------------------------------------------------------------- attack 4: man in the middle, no TLS


class Mitm:
    """An active man in the middle of a plaintext migration: it runs its own channel handshake with each
    side (the handshake is not authenticated without TLS), relays every message re-MAC'd under its keys,
    and at the hand-off does `trick`:

    * "forge_started": keeps Go from the destination and tells the source Started itself;
    * "swallow_started": lets Go through, keeps the destination's Started and tells the source Abort."""

    def __init__(self, target_port: int, trick: str):
        import threading
        self.target = ("127.0.0.1", target_port)
        self.trick = trick
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(IO_TIMEOUT)
        self.port = self.listener.getsockname()[1]
        self.played = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        import select
        try:
            s_sock, _ = self.listener.accept()
            d_sock = socket.create_connection(self.target, timeout=IO_TIMEOUT)
            to_s, to_d = Peer(s_sock, Role.DESTINATION), Peer(d_sock, Role.SOURCE)
            ends = {s_sock: (to_s, to_d), d_sock: (to_d, to_s)}
            while ends:
                ready, _, _ = select.select(list(ends), [], [], IO_TIMEOUT)
                if not ready:
                    raise TimeoutError("relay idle")
                for sock in ready:
                    me, other = ends[sock]
                    data = sock.recv(1 << 20)
                    if not data:
                        ends.clear()
                        break
                    me.conn.receive_data(data)
                    while (ev := me.conn.next_event()) is not NEED_DATA and ev is not CLOSED:
                        self._relay(ev, me, other, to_s, to_d)
            for p in (to_s, to_d):
                p.close()
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            self.error = exc

    def _relay(self, ev, me, other, to_s, to_d):
        if isinstance(ev, m.Hello):
            other.send(m.Hello(version=ev.version, features=ev.features, platform=ev.platform,
                               guest_name=ev.guest_name, memory_bytes=ev.memory_bytes, policy=ev.policy,
                               vcpus=ev.vcpus, es=ev.es, migration_id=ev.migration_id))
        elif isinstance(ev, m.Accept):
            other.send(m.Accept(version=ev.version, features=(), platform=ev.platform))
        elif isinstance(ev, m.Pages):
            other.send_raw(other.conn.send_pages(ev.round, ev.enc_pfns, bytes(ev.enc_headers), bytes(ev.enc_data),
                                                 ev.shr_pfns, bytes(ev.shr_data)))
        elif isinstance(ev, m.Go) and self.trick == "forge_started":
            to_s.send(m.Started())  # the destination never hears Go
            self.played.set()
        elif isinstance(ev, m.Started) and self.trick == "swallow_started":
            to_s.send(m.Abort(AbortCode.CANCELLED, "destination cannot start the guest"))  # a lie
            self.played.set()
        else:
            other.send(ev)  # Start, RoundEnd, Bitmap, VcpuState, Complete, Ready, Go, Keepalive, Abort, ...

    def close(self):
        self.listener.close()
        self._thread.join(IO_TIMEOUT)


def _running(d, name: str) -> bool:
    return _guests(d).get(name) == "running"


def test_attack4_mitm_forged_started_loses_no_guest(daemons):
    src, dst = daemons("src", config=PLAINTEXT), daemons("dst", config=PLAINTEXT)
    src.execute("launch", name="g1", memory=4 << 20)
    mitm = Mitm(dst.port, "forge_started")
    try:
        result = src.execute("migrate", name="g1", to=f"127.0.0.1:{mitm.port}", timeout=60)
    finally:
        mitm.close()
    assert mitm.played.is_set(), mitm.error
    assert result["status"] == "uncertain", result
    dst.wait_for_log(lambda r: r.get("event") == "incoming_failed")  # it saw the end without Go ...
    assert "g1" not in _guests(dst)                       # ... and dropped what it had: nothing there
    assert _guests(src) == {"g1": "migrating"}            # ... and the source did not destroy its copy
    src.execute("resolve", name="g1", run_here=True)          # the operator finds it nowhere else
    assert _running(src, "g1") and src.execute("verify", name="g1")["ok"] is True


def test_attack4_mitm_swallowed_started_and_forged_abort_never_two_copies(daemons):
    src, dst = daemons("src", config=PLAINTEXT), daemons("dst", config=PLAINTEXT)
    src.execute("launch", name="g1", memory=4 << 20)
    mitm = Mitm(dst.port, "swallow_started")
    try:
        with pytest.raises(Exception) as ei:
            src.execute("migrate", name="g1", to=f"127.0.0.1:{mitm.port}", timeout=60)
    finally:
        mitm.close()
    assert mitm.played.is_set(), mitm.error
    assert "uncertain" in str(ei.value), ei.value
    assert _running(dst, "g1")                            # Go reached it: it runs there
    assert not _running(src, "g1")                        # the forged Abort did not resume it here
    assert src.execute("status", name="g1")["migration"]["status"] == "uncertain"
    src.execute("resolve", name="g1", run_here=False)         # the operator sees it on the destination
    assert _guests(src) == {"g1": "migrated"} and _running(dst, "g1")
    assert dst.execute("verify", name="g1")["ok"] is True
