"""Issue 17, the hand-off half: the settlement query and its fence, played against a real `sevmigd serve`
destination on loopback by scripted fleet members (real TLS certificates naming their own chips, real
firmware wrapping real sessions), and the attacks on it:

* a query from the platform that sent the session fences a `ready` copy: it answers not_started, durably,
  and a Go still in flight on the old connection is refused (Abort in GO), the guest never starts;
* a forged query from another fleet member (a valid TLS certificate, for its own chip) neither fences
  the copy nor learns anything (the same `unknown` as for a session that does not exist);
* over plaintext the destination answers nothing but `unknown` (issue 11: no unauthenticated word
  changes who holds a guest);
* a fake destination at the address (a fleet member answering "not_started") cannot make the source
  resume a guest that runs on the real destination.

The scripted peers use blocking sockets with deadlines (IO_TIMEOUT); nothing sleeps to synchronise.
"""

from __future__ import annotations

import json
import os
import stat
import threading

import trio

from sevmigd.daemon.settle import UNKNOWN_REASON
from sevmigd.wire import Role
from sevmigd.wire import messages as m
from sevmigd.wire.errors import AbortCode
from sevmigd.wire.messages import MsgType
from sevmigd.testing.cells import guests_outlive_daemons
from sevmigd.testing.daemons import CTL_TIMEOUT_S
from test_e2e_migration import FrameProxy, launch, tls_terminating
from test_security import IO_TIMEOUT, _platform_of, _tls_client
from test_security_attacks import PLAINTEXT, AttackerHost, Peer, ThreadedListener, _hello, _server_tls, fleet_ca


class MemberSource(AttackerHost):
    """A fleet member (its chain under the fleet's ARK, a TLS certificate naming its chip) with its own
    firmware and a guest: it sends the guest for real and stops where the test says."""

    def __init__(self, monkeypatch, tmp_path, name: str, *, tls: bool = True, memory_bytes: int = 1 << 20):
        from sevmigd.guest.vm import GuestConfig, SevVm
        from sevmigd.psp import chain
        from sevmigd.psp.firmware import Firmware
        from sevmigd.psp.identity import PlatformIdentity
        monkeypatch.setattr(chain, "validate_platform", lambda *a, **k: None)
        self.identity = PlatformIdentity.create(fleet_ca("fleet"), os.urandom)
        self.fw = Firmware(self.identity)
        self.fw.init()
        self.vm = SevVm.launch(self.fw, GuestConfig(name, memory_bytes, seed=5), asid=1, rng=os.urandom)
        self.vm.run(0.05)
        self.name = name
        self.tls = _tls_client(tmp_path / f"tls-{name}", self.identity) if tls else None

    def connect(self, port: int) -> Peer:
        return Peer.connect(port, tls=self.tls)

    def until_ready(self, port: int) -> Peer:
        """A real migration of our guest up to the destination's Ready (Go not sent)."""
        peer = self.connect(port)
        hello = _hello(_platform_of(identity=self.identity), name=self.name)
        peer.send(hello)
        accept = peer.receive()
        assert isinstance(accept, m.Accept), accept
        orig_receive, orig_send = peer.receive, peer.send
        ready = {}

        def send(msg):
            if isinstance(msg, m.Go):
                raise _StopBeforeGo
            orig_send(msg)

        def receive():
            msg = orig_receive()
            if isinstance(msg, m.Ready):
                ready["msg"] = msg
            return msg

        peer.send, peer.receive = send, receive
        try:
            self.send_guest(peer, hello, accept)
        except _StopBeforeGo:
            pass
        finally:
            peer.send, peer.receive = orig_send, orig_receive
        assert "msg" in ready, "the destination did not say Ready"
        return peer


class _StopBeforeGo(Exception):
    pass


def ask(port: int, tls, session_id: str, migration_id: str = "feedfacefeedface") -> m.Answer | None:
    """One settlement query on a new connection; the answer, or None when the connection ended without."""
    q = Peer.connect(port, tls=tls)
    try:
        q.send(m.Query(version=1, migration_id=migration_id, session_id=session_id))
        return q.receive()
    finally:
        q.close()


def _records(d, role: str = "destination") -> list:
    """The daemon's in-flight migration records (RUNTIME/migrations/, the harness's runtime dir)."""
    import pathlib
    return sorted((pathlib.Path(d._sock_dir) / "run" / "migrations").glob(f"{role}-*.json"))


def _runs(d, name: str) -> bool:
    return d.guests().get(name) == "running"


def test_query_fences_a_ready_copy_and_the_go_in_flight_is_refused(daemons, monkeypatch, tmp_path):
    dst = daemons("dst")
    src = MemberSource(monkeypatch, tmp_path, "fenced")
    peer = src.until_ready(dst.port)
    sid = peer.conn.session_id
    try:
        records = _records(dst)
        assert len(records) == 1
        assert stat.S_IMODE(records[0].stat().st_mode) == 0o600
        assert json.loads(records[0].read_text())["phase"] == "ready"   # recorded before Ready was sent
        answer = ask(dst.port, src.tls, sid)
        assert isinstance(answer, m.Answer) and answer.outcome == m.OUTCOME_NOT_STARTED, answer
        assert json.loads(records[0].read_text())["phase"] == "aborted"  # the fence is durable
        # the Go that was still in flight on the old connection: refused, the guest never starts here
        peer.send(m.Go())
        reply = peer.receive()
    finally:
        peer.close()
    assert reply is None or isinstance(reply, m.Abort), reply
    assert not _runs(dst, "fenced")
    dst.wait_for_log(lambda r: r.get("event") == "incoming_failed" and r.get("guest") == "fenced",
                     timeout=CTL_TIMEOUT_S)
    assert "fenced" not in dst.guests()
    assert dst.execute("server-info")["psp_guests"] == 0
    # asked again: the same answer (a promise kept)
    assert ask(dst.port, src.tls, sid).outcome == m.OUTCOME_NOT_STARTED


def _arrive(dst, src: MemberSource, name: str) -> str:
    """Migrate `name` from `src` into `dst` up to Started (Ready, Go, Started) and return the session id."""
    peer = src.until_ready(dst.port)
    sid = peer.conn.session_id
    try:
        peer.send(m.Go())
        assert isinstance(peer.receive(), m.Started)
    finally:
        peer.close()
    assert _runs(dst, name)
    return sid


def test_a_query_after_go_says_started(daemons, monkeypatch, tmp_path):
    dst = daemons("dst")
    src = MemberSource(monkeypatch, tmp_path, "arrived")
    sid = _arrive(dst, src, "arrived")
    assert ask(dst.port, src.tls, sid).outcome == m.OUTCOME_STARTED
    # after a SIGKILL and restart of the destination daemon the record still answers: "started" when the
    # guest outlived the daemon (VMM processes), else "unknown" -- never "started" for a guest that died
    # here, which would make the source drop the last copy
    dst.restart()
    answer = ask(dst.port, src.tls, sid)
    if guests_outlive_daemons():
        assert answer.outcome == m.OUTCOME_STARTED
    else:
        assert answer.outcome == m.OUTCOME_UNKNOWN and "did not survive" in answer.reason


def test_a_restarted_destination_never_starts_a_ready_copy_by_an_older_sessions_record(daemons, monkeypatch,
                                                                                        tmp_path):
    """The fault cells kill_dst@readiness / @confirmation with VMM processes ended with two running copies:
    a guest named "g" once arrived here (session 1: committed, started) and left; it comes back (session 2)
    and this daemon is SIGKILLed after Ready, before Go. The restarted daemon re-adopts session 2's copy
    (its VMM outlived the daemon) and must fence and discard it -- the source resumes its own copy on the
    answer not_started -- not start it because session 1's record, found by the guest's name, says
    committed. Records name the VMM holding their copy, and the restart settles before anyone can ask."""
    dst = daemons("dst", config={"vmm": "process"})
    sid1 = _arrive(dst, MemberSource(monkeypatch, tmp_path, "g"), "g")
    dst.execute("stop", name="g")          # it left (as by a migration away): session 1 stays committed
    assert "g" not in dst.vmm_manifests()

    again = MemberSource(monkeypatch, tmp_path / "again", "g")
    peer = again.until_ready(dst.port)     # session 2: Ready sent, Go not
    sid2 = peer.conn.session_id
    assert "g" in dst.vmm_manifests()
    try:
        dst.restart()                      # SIGKILL; the incoming copy's VMM runs on
        adopted = [r for r in dst.logs[dst._mark:] if r.get("event") == "vmm_adopted"]
        assert [r["guest"] for r in adopted] == ["g"], adopted
    finally:
        peer.close()
    assert "g" not in dst.guests()                         # neither started nor left as an incoming copy
    assert not any(r.get("event") == "incoming_started_after_restart" for r in dst.logs[dst._mark:])
    assert dst.vmm_manifests() == {}                       # session 2's VMM quit ...
    assert dst.execute("server-info")["psp_guests"] == 0   # ... and its PSP context is decommissioned
    phases = {json.loads(p.read_text())["session_id"]: json.loads(p.read_text())["phase"] for p in _records(dst)}
    assert phases == {sid1: "committed", sid2: "aborted"}
    # the source of session 2 asks: not started, so it resumes its own copy -- the only one
    assert ask(dst.port, again.tls, sid2).outcome == m.OUTCOME_NOT_STARTED


def test_attack_forged_query_from_another_platform_neither_fences_nor_reveals(daemons, monkeypatch, tmp_path):
    """A fleet member (valid TLS certificate for its own chip) asks about another platform's session, whose
    id it may have read in a log: it gets exactly what it gets for a session that does not exist, the
    copy is not fenced, and the real source's Go still starts the guest."""
    dst = daemons("dst")
    src = MemberSource(monkeypatch, tmp_path, "victim")
    peer = src.until_ready(dst.port)
    sid = peer.conn.session_id
    from sevmigd.psp.identity import PlatformIdentity
    mallory = _tls_client(tmp_path / "mallory", PlatformIdentity.create(fleet_ca("fleet"), os.urandom))
    try:
        forged = ask(dst.port, mallory, sid)
        nonexistent = ask(dst.port, mallory, "0" * 32)
        assert forged.outcome == nonexistent.outcome == m.OUTCOME_UNKNOWN
        assert forged.reason == nonexistent.reason == UNKNOWN_REASON
        peer.send(m.Go())
        assert isinstance(peer.receive(), m.Started)   # not fenced
    finally:
        peer.close()
    assert _runs(dst, "victim")
    assert dst.execute("verify", {"name": "victim"})["ok"]
    # nor does it learn that the guest started
    assert ask(dst.port, mallory, sid).reason == UNKNOWN_REASON
    assert ask(dst.port, src.tls, sid).outcome == m.OUTCOME_STARTED


def test_plaintext_queries_are_never_answered(daemons, monkeypatch, tmp_path):
    """insecure_plaintext: nobody proves who asks, so the destination answers `unknown` and fences nothing."""
    dst = daemons("dst", config=PLAINTEXT)
    src = MemberSource(monkeypatch, tmp_path, "plain", tls=False)
    peer = src.until_ready(dst.port)
    sid = peer.conn.session_id
    try:
        answer = ask(dst.port, None, sid)
        assert answer.outcome == m.OUTCOME_UNKNOWN and "authenticated" in answer.reason
        peer.send(m.Go())
        assert isinstance(peer.receive(), m.Started)
    finally:
        peer.close()
    assert _runs(dst, "plain")


class FakeAnswerer(ThreadedListener):
    """A fleet member's TLS listener (its certificate names its own chip) that answers every settlement
    query with "not_started": what a fake destination at the address would say to make the source resume."""

    def __init__(self, tmp_path):
        from sevmigd.psp.identity import PlatformIdentity
        self.tls = _server_tls(tmp_path / "fake", PlatformIdentity.create(fleet_ca("fleet"), os.urandom))
        self.asked = threading.Event()
        super().__init__()

    def _serve(self):
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            try:
                peer = Peer(self.tls.wrap_socket(sock, server_side=True), Role.DESTINATION)
                q = peer.receive()
                if isinstance(q, m.Query):
                    self.asked.set()
                    peer.send(m.Answer(session_id=q.session_id, outcome=m.OUTCOME_NOT_STARTED, reason="trust me"))
                peer.close()
            except OSError:
                pass

    def close(self):
        super().close()
        self._thread.join(IO_TIMEOUT)


async def test_attack_fake_destination_answering_the_query_cannot_make_the_source_resume(daemons, tmp_path):
    """Started is lost; the source's settlement queries then reach a fake destination (a fleet member at
    the address) that answers not_started. Believing it would resume a guest that runs on the real
    destination: two copies. The source trusts only the platform it migrated to; once the real
    destination is reachable again it settles (released)."""
    fast = {"settle_retry_initial_s": 0.2, "settle_retry_max_s": 1.0}
    a, b = daemons(config=fast), daemons(config=fast)
    launch(a, "g", "16M", "--dirty-rate", "2")
    fake = FakeAnswerer(tmp_path)
    route = {"query_to_fake": False}
    proxy = FrameProxy(b.host, b.port, lambda d, t, f: None if t == MsgType.STARTED else f,
                       tls=tls_terminating(a, b))
    real_target = proxy.target
    mark = len(a.logs)
    try:
        with trio.fail_after(CTL_TIMEOUT_S * 2):
            async with trio.open_nursery() as n:
                # every connection after the migration's goes to the fake (raw TCP relay to its port)
                orig_handle = proxy._handle
                conns = {"n": 0}

                async def handle(client):
                    conns["n"] += 1
                    if conns["n"] == 1 or not route["query_to_fake"]:
                        return await orig_handle(client)
                    upstream = await trio.open_tcp_stream("127.0.0.1", fake.port)
                    async with client, upstream, trio.open_nursery() as nn:
                        async def pump(rx, tx):
                            try:
                                async for data in rx:
                                    await tx.send_all(data)
                            except (trio.BrokenResourceError, trio.ClosedResourceError):
                                pass
                            nn.cancel_scope.cancel()
                        nn.start_soon(pump, client, upstream)
                        nn.start_soon(pump, upstream, client)

                route["query_to_fake"] = True
                proxy._handle = handle
                port = await n.start(proxy.serve)
                res = await a.actl("migrate", "g", "--to", f"127.0.0.1:{port}", timeout=CTL_TIMEOUT_S)
                assert res.returncode == 1 and "uncertain" in res.stderr
                # the source's first settlement attempt reaches the fake: refused, or (the harm) believed
                seen = await trio.to_thread.run_sync(lambda: a.wait_for_log(
                    lambda r: r.get("event") in ("settle_peer_is_not_the_destination", "migration_resolved"),
                    start=mark, timeout=CTL_TIMEOUT_S))
                st = a.ctl_json("status", "g")
                assert _runs(b, "g")
                assert st["state"] == "migrating" and st["migration"]["status"] == "uncertain", \
                    f"the source believed the fake destination ({seen['event']}): guest {st['state']} on both hosts"
                assert seen["event"] == "settle_peer_is_not_the_destination"
                # the network is back: the real destination answers, the source releases
                route["query_to_fake"] = False
                proxy.target = real_target
                await trio.to_thread.run_sync(lambda: a.wait_for_log("migration_resolved", start=mark,
                                                                     timeout=CTL_TIMEOUT_S * 2))
                n.cancel_scope.cancel()
    finally:
        fake.close()
    assert a.guests() == {"g": "migrated"} and b.guests() == {"g": "running"}
    st = a.ctl_json("status", "g")
    assert st["migration"]["settlement"] == "released" and st["migration"]["settled_by"] == "query"
    assert b.execute("verify", {"name": "g"})["ok"]


# ------------------------------------------------------------------------------ the records on disk


def test_records_are_private_atomic_and_damaged_ones_are_reported(tmp_path):
    from sevmigd.daemon.settle import KEEP_FINISHED, Record, RecordStore
    st = RecordStore(str(tmp_path))
    rec = Record("destination", "m1", "ab" * 16, "g", "127.0.0.1:1", "c" * 64, "ready", updated_at=1.0)
    st.save(rec)
    path = tmp_path / "migrations" / rec.file_name
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "migrations").stat().st_mode) == 0o700
    assert not [p for p in (tmp_path / "migrations").iterdir() if p.name.startswith(".")]  # no temporaries left
    rec.phase = "committed"
    st.save(rec)
    (tmp_path / "migrations" / "source-x-y.json").write_bytes(b"{not json")
    os.chmod(tmp_path / "migrations" / "source-x-y.json", 0o600)
    bad_phase = Record("source", "m2", "cd" * 16, "g", "h:1", "c" * 64, "go_sent")
    st.save(bad_phase)
    p2 = tmp_path / "migrations" / bad_phase.file_name
    p2.write_text(p2.read_text().replace("go_sent", "flying"))
    recs, bad = st.load()
    assert [(r.migration_id, r.phase) for r in recs] == [("m1", "committed")]
    assert len(bad) == 2 and any("source-x-y.json" in b for b in bad) and any("flying" in b for b in bad)
    # finished records beyond KEEP_FINISHED per role are pruned, oldest first; unfinished ones never
    many = [Record("source", f"p{i:04d}", "ef" * 16, "g", "h:1", "c" * 64, "settled", "released", "completed",
                   updated_at=float(i)) for i in range(KEEP_FINISHED + 3)]
    live = Record("source", "live", "ef" * 16, "g", "h:1", "c" * 64, "go_sent", updated_at=0.0)
    for r in many + [live]:
        st.save(r)
    recs, _ = st.load()
    st.prune(recs)
    left = {r.migration_id for r in st.load()[0] if r.role == "source"}
    assert "live" in left and "p0000" not in left and "p0002" not in left and f"p{KEEP_FINISHED + 2:04d}" in left
