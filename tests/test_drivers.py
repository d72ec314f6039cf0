"""Source and destination drivers joined in memory (no sockets, no subprocesses).

Two in-process daemons (`Daemon` with injected identity / firmware of one fleet, not serving) run
`MigrationManager.migrate_out` and `handle_incoming` over `trio.testing.memory_stream_pair()` streams, with
an optional frame-aware tap in between that can cut, stall or corrupt the conversation. Real crypto,
real firmware, real guests under their workload.

Rules: `fail_after` on every test; timeouts exercised under `MockClock(autojump_threshold=0)`; no sleep
is used to wait for something to happen (events and the progress callback are).
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import trio
import trio.testing

from sevmigd.testing.frames import pop_frames
from sevmigd.daemon.config import Config
from sevmigd.daemon import destination as destination_mod
from sevmigd.daemon import psprunner as psprunner_mod
from sevmigd.daemon.migration import MigrationError, MigrationManager
from sevmigd.daemon.server import Daemon
from sevmigd.errors import ConfigError
from sevmigd.guest.vm import GuestConfig
from sevmigd.psp.firmware import Firmware
from sevmigd.psp.identity import FleetCA, PlatformIdentity
from sevmigd.psp.policy import Policy
from sevmigd.wire.errors import AbortCode
from sevmigd.wire.messages import MsgType

MiB = 1 << 20
MAC_TAIL = 34  # c4 20 + HMAC-SHA256 at the end of every authenticated frame


@pytest.fixture(scope="module")
def fleet():
    ca = FleetCA.create(os.urandom, rsa_bits=2048)
    return ca


def make_daemon(tmp_path, name, ca, *, min_command_time=0.0, tls_fleet=None, **cfg):
    """An in-process daemon of fleet `ca`; its TLS certificate comes from `tls_fleet`'s TLS CA (default:
    its own fleet's)."""
    from sevmigd import store
    from sevmigd.daemon.config import TlsConfig
    from sevmigd.testing.pki import provision, tls_ca_for

    identity = provision(tmp_path / name, ca)  # with its TLS certificate: the drivers speak mutual TLS
    if tls_fleet is not None:
        store.issue_host_tls(tmp_path / name, tls_ca_for(tls_fleet), identity)
    fw = Firmware(identity, min_command_time=min_command_time)
    fw.init()
    tls = TlsConfig() if cfg.get("insecure_plaintext") else TlsConfig(**store.tls_paths(tmp_path / name))
    base = Config(state_dir=str(tmp_path / name), control=str(tmp_path / f"{name}.sock"), tls=tls)
    config = dataclasses.replace(base, **cfg)
    return Daemon(config, identity=identity, fw=fw, trusted_roots=[ca.ark])


@pytest.fixture
def pair(tmp_path, fleet):
    def make(**cfg):
        return make_daemon(tmp_path, "a", fleet, **cfg), make_daemon(tmp_path, "b", fleet, **cfg)
    return make


def guest_config(name="g1", mib=16, **kw):
    kw.setdefault("dirty_rate_mib_s", 8.0)
    kw.setdefault("shared_fraction", 0.25)
    kw.setdefault("flip_rate", 20.0)
    kw.setdefault("seed", 7)
    return GuestConfig(name=name, memory_bytes=mib * MiB, **kw)


class Tap:
    """A frame-aware pump between two memory stream pairs: source <-> tap <-> destination.

    `hook(direction, mtype, frame) -> bytes | None | "cut" | "stall"`: the bytes to forward (possibly
    changed), None to drop, "cut" to close both sides (EOF to both peers), "stall" to stop forwarding
    anything in either direction while keeping the streams open (a dead peer)."""

    def __init__(self, hook=None):
        self.hook = hook or (lambda d, t, f: f)
        self.src_side, self._a = trio.testing.memory_stream_pair()
        self._b, self.dst_side = trio.testing.memory_stream_pair()
        self.stalled = trio.Event()
        self.seen: list[tuple[str, int]] = []
        self.captured = {"s2d": bytearray(), "d2s": bytearray()}

    async def run(self, tls=None):
        """`tls` = (server_ctx, client_ctx): terminate the source's TLS as the destination and open TLS to
        the destination as the source (the test holds both hosts' keys), so frames are visible in between."""
        if tls is not None:
            self._a = trio.SSLStream(self._a, tls[0], server_side=True)
            self._b = trio.SSLStream(self._b, tls[1], server_hostname=None)
            async with trio.open_nursery() as n:
                n.start_soon(self._a.do_handshake)
                n.start_soon(self._b.do_handshake)
        async with trio.open_nursery() as n:
            n.start_soon(self._pump, self._a, self._b, "s2d", n.cancel_scope)
            n.start_soon(self._pump, self._b, self._a, "d2s", n.cancel_scope)

    async def _pump(self, rx, tx, direction, scope):
        buf = bytearray()
        try:
            while True:
                data = await rx.receive_some(1 << 20)
                if not data:
                    await tx.aclose()
                    return
                buf += data
                for frame, t in pop_frames(buf):
                    self.seen.append((direction, t))
                    if self.stalled.is_set():
                        await trio.sleep_forever()
                    out = self.hook(direction, t, frame)
                    if out == "cut":
                        await self._a.aclose()
                        await self._b.aclose()
                        scope.cancel()
                        return
                    if out == "stall":
                        self.stalled.set()
                        await trio.sleep_forever()
                    if out is not None:
                        self.captured[direction] += out
                        await tx.send_all(out)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(tx)


async def run_migration(src, dst, name, *, tap=None, on_progress=None, **kw):
    """Migrate `name` from src to dst; returns (stats or MigrationError, destination done Event)."""
    if tap is None:
        s_stream, d_stream = trio.testing.memory_stream_pair()
    else:
        s_stream, d_stream = tap.src_side, tap.dst_side
    result = {}
    async with trio.open_nursery() as n:
        if tap is not None:
            tls = None
            if src.config.tls.enabled:
                from sevmigd.daemon import tls as tls_mod
                tls = (tls_mod.server_context(dst.config), tls_mod.client_context(src.config))
            n.start_soon(tap.run, tls)

        async def dest():
            await dst.migrations.handle_incoming(d_stream, "source")

        async def factory():
            return s_stream

        n.start_soon(dest)
        try:
            result["stats"] = await src.migrations.migrate_out(name, "destination", 4446, stream_factory=factory,
                                                                progress=on_progress, **kw)
        except MigrationError as exc:
            result["error"] = exc
        # the destination handler ends by itself (after "started", an abort or EOF); a stalled tap is
        # torn down here so the nursery can end
        if tap is not None and tap.stalled.is_set():
            n.cancel_scope.cancel()
    return result


async def launch(d, nursery, gcfg):
    d.nursery = nursery
    return await d.launch_guest(gcfg)


def assert_running_on_source(src, dst, name):
    g = src.guests[name]
    assert g.state == "running"
    assert not g.vm.host.paused
    assert g.vm.sev_state == "RUNNING"
    assert g.vm.host.throttle_pct == 0
    assert g.vm.verify().ok
    assert name not in dst.guests
    assert dst.fw.guest_count == 0  # the partial copy was DECOMMISSIONed


# ------------------------------------------------------------------------------------------ happy paths


async def test_guest_under_workload_migrates_and_verifies(pair):
    src, dst = pair()
    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            await launch(src, n, guest_config())
            dst.nursery = n
            events = []
            res = await run_migration(src, dst, "g1", on_progress=events.append)
            assert "error" not in res, res.get("error")
            stats = res["stats"]
            assert stats["status"] == "completed"
            assert stats["role"] == "source"
            assert stats["private_pages"] > 0 and stats["shared_pages"] > 0
            assert stats["private_pages"] + stats["shared_pages"] >= 16 * MiB // 4096
            assert stats["downtime_ms"] is not None and stats["downtime_ms"] >= 0
            assert stats["round"] >= 1 and stats["transferred"] > 16 * MiB
            assert stats["error"] is None
            assert events and events[-1]["status"] == "completed"
            assert src.guests["g1"].state == "migrated"
            assert src.fw.guest_count == 0  # released: DECOMMISSIONed on the source
            g = dst.guests["g1"]
            assert g.state == "running" and g.vcpus_running
            rep = g.vm.verify()
            assert rep.ok, rep.mismatches[:10]
            # the workload goes on from where it was, and still verifies
            g.vm.run(0.2)
            assert g.vm.verify().ok
            assert dst.migrations.history[-1]["status"] == "completed"
            n.cancel_scope.cancel()


async def test_a_to_b_to_a_without_restart(pair):
    a, b = pair()
    with trio.fail_after(90):
        async with trio.open_nursery() as n:
            await launch(a, n, guest_config(shared_fraction=0.1))
            b.nursery = n
            res = await run_migration(a, b, "g1")
            assert "error" not in res, res.get("error")
            boots = b.guests["g1"].vm.host.get_vcpu_state()[0].get("boots")
            res = await run_migration(b, a, "g1")
            assert "error" not in res, res.get("error")
            g = a.guests["g1"]
            assert g.state == "running"
            assert g.vm.verify().ok
            assert g.vm.host.get_vcpu_state()[0].get("boots") == boots  # no reboot on the way
            assert b.guests["g1"].state == "migrated"
            n.cancel_scope.cancel()


async def test_sev_es_guest_migrates_its_vmsa(pair):
    src, dst = pair()
    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            await launch(src, n, guest_config(policy=int(Policy.ES), mib=8))
            dst.nursery = n
            seen = []
            tap = Tap(lambda d, t, f: (seen.append((d, t, len(f))), f)[1])
            res = await run_migration(src, dst, "g1", tap=tap)
            assert "error" not in res, res.get("error")
            vcpu_frames = [x for x in seen if x[1] == MsgType.VCPU_STATE]
            assert len(vcpu_frames) == 1
            assert vcpu_frames[0][2] > 4096  # it carried a VMSA packet, not a few registers
            g = dst.guests["g1"]
            assert g.vm.verify().ok
            g.vm.run(0.1)
            assert g.vm.verify().ok
            n.cancel_scope.cancel()


# ------------------------------------------------------------------------------------------ refusals


async def test_refusals_before_anything_is_sent(pair):
    src, dst = pair()
    with trio.fail_after(30):
        async with trio.open_nursery() as n:
            await launch(src, n, guest_config("nosend", mib=4, policy=int(Policy.NOSEND)))
            await launch(src, n, guest_config("noctl", mib=4, migration_control=False))

            async def never():  # the refusals happen before any connection is made
                raise AssertionError("connected")

            for name, word in (("nosend", "NOSEND"), ("noctl", "MSR_KVM_MIGRATION_CONTROL")):
                with pytest.raises(MigrationError) as ei:
                    await src.migrations.migrate_out(name, "x", 1, stream_factory=never)
                assert ei.value.code is AbortCode.POLICY_REFUSED
                assert word in str(ei.value)
                assert src.guests[name].state == "running"
            with pytest.raises(ConfigError):
                await src.migrations.migrate_out("absent", "x", 1, stream_factory=never)
            with pytest.raises(ConfigError):
                src.migrations.cancel("nosend")
            n.cancel_scope.cancel()


async def test_destination_refuses_existing_name_and_untrusted_source(tmp_path, pair, fleet):
    src, dst = pair()
    # A host with a TLS certificate of this fleet but an SEV platform of another: TLS lets it in, the
    # platform chain does not.
    stranger = make_daemon(tmp_path, "c", FleetCA.create(os.urandom, rsa_bits=2048), tls_fleet=fleet)
    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            await launch(src, n, guest_config("g1", mib=4))
            await launch(dst, n, guest_config("g1", mib=4, seed=1))
            res = await run_migration(src, dst, "g1")
            assert res["error"].code is AbortCode.GUEST_EXISTS
            assert "already exists" in str(res["error"])
            assert src.guests["g1"].state == "running" and not src.guests["g1"].vm.host.paused

            await launch(stranger, n, guest_config("g2", mib=4))
            res = await run_migration(stranger, src, "g2")
            assert res["error"].code is AbortCode.UNTRUSTED_PLATFORM
            assert "source platform chain rejected" in str(res["error"])
            assert stranger.guests["g2"].state == "running"
            assert "g2" not in src.guests
            n.cancel_scope.cancel()


# ------------------------------------------------------------------------------------------ failures


async def test_cancel_mid_migration_keeps_guest_on_source(pair):
    src, dst = pair()
    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            await launch(src, n, guest_config(mib=32))
            dst.nursery = n

            def progress(stats):
                if stats["status"] == "active" and stats["transferred"] > 2 * MiB and "g1" in src.migrations.outgoing:
                    src.migrations.cancel("g1")

            res = await run_migration(src, dst, "g1", on_progress=progress, max_bandwidth_mib_s=64)
            err = res["error"]
            assert err.code is AbortCode.CANCELLED
            assert_running_on_source(src, dst, "g1")
            assert src.guests["g1"].migration.status == "cancelled"
            assert dst.migrations.history[-1]["status"] == "cancelled"
            assert "cancelled by the operator" in dst.migrations.history[-1]["error"]
            n.cancel_scope.cancel()


async def test_destination_eof_before_go_keeps_source_running(pair):
    src, dst = pair()
    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            await launch(src, n, guest_config())
            dst.nursery = n
            tap = Tap(lambda d, t, f: "cut" if (d == "d2s" and t == MsgType.READY) else f)
            res = await run_migration(src, dst, "g1", tap=tap)
            assert isinstance(res.get("error"), MigrationError)
            assert ("d2s", MsgType.READY) in tap.seen
            assert ("s2d", MsgType.GO) not in tap.seen
            assert_running_on_source(src, dst, "g1")
            # and the guest can still be migrated afterwards
            res = await run_migration(src, dst, "g1")
            assert "error" not in res, res.get("error")
            assert dst.guests["g1"].vm.verify().ok
            n.cancel_scope.cancel()


async def test_corrupt_ciphertext_byte_is_bad_measurement(pair):
    src, dst = pair()
    flipped = []

    def hook(direction, t, frame):
        # enc_data is the last field before the MAC: flip a byte just before the MAC tail of the first
        # Pages frame that carries private pages. The channel MAC does not cover ciphertext by design.
        if direction == "s2d" and t == MsgType.PAGES and not flipped and len(frame) > 8192:
            b = bytearray(frame)
            b[-MAC_TAIL - 100] ^= 0x01
            flipped.append(True)
            return bytes(b)
        return frame

    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            await launch(src, n, guest_config(shared_fraction=0.0))
            dst.nursery = n
            res = await run_migration(src, dst, "g1", tap=Tap(hook))
            err = res["error"]
            assert flipped
            assert err.code is AbortCode.FIRMWARE_ERROR
            assert "RECEIVE_UPDATE_DATA failed: BAD_MEASUREMENT (0x0b)" in str(err)
            assert_running_on_source(src, dst, "g1")
            assert src.guests["g1"].migration.error_code == "FIRMWARE_ERROR"
            n.cancel_scope.cancel()


async def test_stalled_destination_detected_by_peer_timeout(pair, mock_clock, monkeypatch):
    # Under the autojump clock a worker thread looks like an idle run loop: no worker threads.
    monkeypatch.setattr(psprunner_mod, "PSP_IN_THREAD", False)
    monkeypatch.setattr(destination_mod, "POPULATE_INCOMING", False)
    mock_clock.autojump_threshold = 0
    src, dst = pair(peer_timeout_s=5.0, keepalive_interval_s=1.0)
    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            await launch(src, n, guest_config(dirty_rate_mib_s=0.0, flip_rate=0.0))
            dst.nursery = n
            stalled = []

            def stall(d, t, f):
                if d == "s2d" and t == MsgType.ROUND_END:
                    stalled.append(trio.current_time())
                    return "stall"
                return f

            res = await run_migration(src, dst, "g1", tap=Tap(stall))
            err = res["error"]
            assert err.code is AbortCode.TIMEOUT
            assert "sent nothing for 5 s" in str(err)
            # Timed from the stall: the set-up before it has worker-thread hops (the replay record's
            # fsync), which the autojump clock may fill with jumps.
            assert stalled and trio.current_time() - stalled[0] < 5.0 + 3.0
            assert src.guests["g1"].state == "running" and not src.guests["g1"].vm.host.paused
            assert src.guests["g1"].vm.sev_state == "RUNNING"
            assert "g1" not in dst.guests and dst.fw.guest_count == 0
            n.cancel_scope.cancel()


async def test_convergence_failure_gives_up_and_keeps_running(pair):
    # A guest dirtying far faster than a 4 MiB/s link with a 1 ms downtime limit never converges.
    src, dst = pair(max_rounds=3)
    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            await launch(src, n, guest_config(mib=4, dirty_rate_mib_s=64.0))
            dst.nursery = n
            res = await run_migration(src, dst, "g1", downtime_limit_ms=1, max_bandwidth_mib_s=4)
            err = res["error"]
            assert err.code is AbortCode.CONVERGENCE_FAILED
            assert "did not converge after 3 rounds" in str(err)
            assert_running_on_source(src, dst, "g1")
            n.cancel_scope.cancel()


# ------------------------------------------------------------------------------------------ after "go"


async def test_started_lost_leaves_source_uncertain_until_resolved(pair):
    """The destination started the guest but "started" never reached the source: the source must not
    resume on its own; resolve(run_here=False) releases its copy."""
    src, dst = pair()
    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            await launch(src, n, guest_config())
            dst.nursery = n
            tap = Tap(lambda d, t, f: "cut" if (d == "d2s" and t == MsgType.STARTED) else f)
            res = await run_migration(src, dst, "g1", tap=tap)
            err = res["error"]
            assert "uncertain" in str(err) and "resolve" in str(err)
            g = src.guests["g1"]
            assert g.state == "migrating" and g.vm.host.paused  # never resumed by itself
            assert g.migration.status == "uncertain"
            assert dst.guests["g1"].state == "running" and dst.guests["g1"].vm.verify().ok
            with pytest.raises(ConfigError):
                src.migrations.cancel("g1")  # nothing to cancel any more
            with pytest.raises(MigrationError):
                await src.migrations.migrate_out("g1", "x", 1)  # refused until resolved
            out = src.migrations.resolve("g1", run_here=False)
            assert out["status"] == "completed" and "released" in out["resolution"]
            assert g.state == "migrated" and src.fw.guest_count == 0
            with pytest.raises(ConfigError):
                src.migrations.resolve("g1", run_here=True)
            n.cancel_scope.cancel()


async def test_go_lost_destination_discards_and_source_resumes_on_resolve(pair):
    """"go" never reached the destination: it discards its copy at EOF; the source, uncertain, resumes
    only when told (run_here=True), and the guest is intact."""
    src, dst = pair()
    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            await launch(src, n, guest_config())
            dst.nursery = n
            tap = Tap(lambda d, t, f: "cut" if (d == "s2d" and t == MsgType.GO) else f)
            res = await run_migration(src, dst, "g1", tap=tap)
            assert "uncertain" in str(res["error"])
            g = src.guests["g1"]
            assert g.state == "migrating" and g.vm.host.paused
            assert "g1" not in dst.guests and dst.fw.guest_count == 0
            out = src.migrations.resolve("g1", run_here=True)
            assert "resumed" in out["resolution"]
            assert g.state == "running" and not g.vm.host.paused
            g.vm.run(0.1)
            assert g.vm.verify().ok
            # SEND_CANCEL brought the PSP context back to RUNNING: it migrates again
            assert g.vm.sev_state == "RUNNING"
            res = await run_migration(src, dst, "g1")
            assert "error" not in res, res.get("error")
            assert dst.guests["g1"].vm.verify().ok
            n.cancel_scope.cancel()


async def test_destination_that_cannot_start_hands_the_guest_back(pair, monkeypatch):
    """An Abort from the destination in state GO is its promise not to run the guest: the source resumes."""
    from sevmigd.guest.vm import SevVm

    def broken(self):
        raise RuntimeError("no vCPU for you")

    monkeypatch.setattr(SevVm, "start_incoming", broken)
    src, dst = pair()
    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            await launch(src, n, guest_config())
            dst.nursery = n
            res = await run_migration(src, dst, "g1")
            err = res["error"]
            assert "did not start on the destination" in str(err)
            g = src.guests["g1"]
            assert g.state == "running" and not g.vm.host.paused
            assert g.migration.status == "failed"
            g.vm.run(0.1)
            assert g.vm.verify().ok
            assert "g1" not in dst.guests and dst.fw.guest_count == 0
            n.cancel_scope.cancel()


# ------------------------------------------------------------------------------------------ limits, policy, shutdown


async def test_destination_limits_refuse_before_reserving_memory(tmp_path, fleet):
    src = make_daemon(tmp_path, "a", fleet)
    small = make_daemon(tmp_path, "b", fleet, max_guest_bytes=8 * MiB)
    busy = make_daemon(tmp_path, "c", fleet, max_incoming=0)
    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            await launch(src, n, guest_config(mib=16))
            for dst, word in ((small, "max_guest_bytes"), (busy, "max_incoming")):
                res = await run_migration(src, dst, "g1")
                assert res["error"].code is AbortCode.RESOURCE_LIMIT
                assert word in str(res["error"])
                assert dst.fw.guest_count == 0 and not dst.guests
                assert src.guests["g1"].state == "running"
            n.cancel_scope.cancel()


async def test_allowed_platforms_on_either_side(tmp_path, fleet):
    src = make_daemon(tmp_path, "a", fleet)
    picky_dst = make_daemon(tmp_path, "b", fleet, allowed_platforms=("00" * 8,))
    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            await launch(src, n, guest_config(mib=8))
            res = await run_migration(src, picky_dst, "g1")
            assert res["error"].code is AbortCode.UNTRUSTED_PLATFORM
            assert "not in allowed_platforms" in str(res["error"])
            # the source's own allow-list applies to the destination it is sent to
            picky_src = make_daemon(tmp_path, "c", fleet, allowed_platforms=("11" * 8,))
            dst = make_daemon(tmp_path, "d", fleet)
            dst.nursery = n
            await launch(picky_src, n, guest_config("g2", mib=8))
            res = await run_migration(picky_src, dst, "g2")
            assert res["error"].code is AbortCode.UNTRUSTED_PLATFORM
            assert "destination platform" in str(res["error"])
            assert picky_src.guests["g2"].state == "running"
            assert "g2" not in dst.guests and dst.fw.guest_count == 0
            n.cancel_scope.cancel()


async def test_shutdown_mid_migration_keeps_guest_and_stops_cleanly(pair):
    src, dst = pair()
    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            await launch(src, n, guest_config(mib=32))
            dst.nursery = n
            done = trio.Event()

            async def shut():
                await src.migrations.shutdown()
                done.set()

            def progress(stats):
                if stats["status"] == "active" and stats["transferred"] > MiB and not done.is_set():
                    if src.migrations.outgoing:
                        n.start_soon(shut)

            res = await run_migration(src, dst, "g1", on_progress=progress, max_bandwidth_mib_s=32)
            await done.wait()
            assert res["error"].code is AbortCode.SHUTDOWN
            assert src.migrations.active() == 0
            assert_running_on_source(src, dst, "g1")
            assert src.guests["g1"].migration.status == "cancelled"
            n.cancel_scope.cancel()


async def test_keepalives_carry_a_slow_destination_past_the_peer_timeout(tmp_path, fleet, mock_clock, monkeypatch):
    """A destination whose PSP is slow (pacing) sends nothing for far longer than the peer timeout while
    it works; its keepalives keep the source from declaring it dead."""
    monkeypatch.setattr(psprunner_mod, "PSP_IN_THREAD", False)
    monkeypatch.setattr(destination_mod, "POPULATE_INCOMING", False)
    mock_clock.autojump_threshold = 0
    src = make_daemon(tmp_path, "a", fleet, peer_timeout_s=3.0, keepalive_interval_s=0.5)
    dst = make_daemon(tmp_path, "b", fleet, peer_timeout_s=3.0, keepalive_interval_s=0.5,
                      min_command_time=0.008)  # ~2 s of PSP time per 256-page batch
    with trio.fail_after(600):
        async with trio.open_nursery() as n:
            await launch(src, n, guest_config(mib=8, dirty_rate_mib_s=0.0, flip_rate=0.0))
            dst.nursery = n
            kinds = []
            tap = Tap(lambda d, t, f: (kinds.append((d, t)), f)[1])
            t0 = trio.current_time()
            res = await run_migration(src, dst, "g1", tap=tap)
            assert "error" not in res, res.get("error")
            assert trio.current_time() - t0 > 3 * 3.0  # much longer than the peer timeout ...
            assert ("d2s", MsgType.KEEPALIVE) in kinds  # ... carried by the destination's keepalives
            assert dst.guests["g1"].vm.verify().ok
            n.cancel_scope.cancel()


@pytest.mark.parametrize("direction,mtype", [("s2d", MsgType.GO), ("d2s", MsgType.READY), ("d2s", MsgType.STARTED)])
async def test_duplicated_handoff_frame_never_gives_two_copies(pair, direction, mtype):
    """A replayed hand-off frame breaks the channel MAC/sequence; whatever the timing, the guest ends up
    running in exactly one place (or paused and uncertain on the source only), and a source that kept it
    can migrate it again (its PSP context went back to RUNNING through SEND_CANCEL)."""
    src, dst = pair()
    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            await launch(src, n, guest_config())
            dst.nursery = n
            tap = Tap(lambda d, t, f: f + f if (d == direction and t == mtype) else f)
            res = await run_migration(src, dst, "g1", tap=tap)
            s, d = src.guests["g1"], dst.guests.get("g1")
            src_runs = s.state == "running" and not s.vm.host.paused
            dst_runs = d is not None and d.state == "running"
            assert not (src_runs and dst_runs), (res, s.state, d and d.state)
            if "g1" in src.migrations.uncertain:
                assert s.vm.host.paused  # never resumed by itself
                src.migrations.resolve("g1", run_here=not dst_runs)
                src_runs = not dst_runs
            assert src_runs != dst_runs
            here, there = (src, dst) if src_runs else (dst, src)
            assert here.guests["g1"].vm.verify().ok
            if src_runs:  # the source kept it: it can still be migrated (SEND_START accepted again)
                assert s.vm.sev_state == "RUNNING"
                res = await run_migration(src, dst, "g1")
                assert "error" not in res, res.get("error")
                assert dst.guests["g1"].vm.verify().ok
            n.cancel_scope.cancel()


async def test_max_total_s_bounds_a_round_on_a_collapsed_link(pair, mock_clock, monkeypatch):
    """The planner decides at round ends; max_total_s must also stop a round that would last for ages
    (here: a 16 MiB first round at 256 KiB/s = 64 s against max_total_s = 5 s)."""
    monkeypatch.setattr(psprunner_mod, "PSP_IN_THREAD", False)
    monkeypatch.setattr(destination_mod, "POPULATE_INCOMING", False)
    mock_clock.autojump_threshold = 0
    src, dst = pair(max_total_s=5.0, peer_timeout_s=30.0)
    with trio.fail_after(600):
        async with trio.open_nursery() as n:
            await launch(src, n, guest_config(dirty_rate_mib_s=0.0, flip_rate=0.0))
            dst.nursery = n
            started = []

            def note(d, t, f):
                if t == MsgType.START:
                    started.append(trio.current_time())
                return f

            res = await run_migration(src, dst, "g1", tap=Tap(note), max_bandwidth_mib_s=0.25)
            err = res["error"]
            assert err.code is AbortCode.CONVERGENCE_FAILED
            assert "max_total_s = 5 s" in str(err)
            # Timed from Start, after which the pre-copy and its max_total_s deadline begin (the handshake
            # before it has worker-thread hops, which the autojump clock may fill with jumps).
            assert started and 5.0 - 0.5 <= trio.current_time() - started[0] < 5.0 + 3.0
            assert_running_on_source(src, dst, "g1")
            n.cancel_scope.cancel()
