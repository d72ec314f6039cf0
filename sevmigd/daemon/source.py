"""Source side of a live migration: one `OutgoingMigration` per guest being sent.

Owns the outgoing protocol run over a `Channel`: handshake (Hello / Accept, destination chain verified
against our trusted roots), SEND_START, pre-copy rounds with the guest running (round 1 every page, later
rounds the pages the dirty log reports; private pages through SEND_UPDATE_DATA, shared pages as they are),
convergence as the pure planner decides it (QEMU's rule, auto-converge, give-up), stop-and-copy (pause,
last dirty pages, final page-encryption bitmap, vCPU state or the SEV-ES VMSA through SEND_UPDATE_VMSA),
and the hand-off: Ready -> Go -> Started -> SEND_FINISH -> release.

Which pages go in which round, and how (private or shared), is migrate/ram.py's (QEMU's ram.c): the
driver asks it for the next batch and nothing else. Every SEV command goes through `sevmigd.kvm`
(`SevGuest`: KVM_MEMORY_ENCRYPT_OP with the kernel's structs, as QEMU's target/i386/sev.c; `SevDevice`
for PDH_CERT_EXPORT), with `sev_batch_pages` choosing the batch extension (default) or one
SEND_UPDATE_DATA ioctl per page.

SEND_FINISH comes after "started", not before "go": the PSP context stays in SUPDATE until the hand-off
is known, so every way it can go wrong (go lost, the destination renouncing in GO, an uncertain hand-off
resolved in favour of the source) ends with SEND_CANCEL (SUPDATE -> RUNNING) and a guest that can be
migrated again. Finishing first would leave it SENT, a state from which the firmware allows nothing but
DECOMMISSION: the guest could still run here but never migrate again (found by the fault matrix).
Both orders are legal for the firmware (SEND_FINISH is accepted in SUPDATE at any time); TEK/TIK simply
live on the source PSP until the destination confirmed.

The one rule it must never break (QEMU's too): the source never destroys or gives up its copy until the
destination has taken over. Every failure before "go" leaves the guest running here (SEND_CANCEL, resume,
throttle off, dirty log off), shielded from cancellation. After "go" has started onto the wire the source
never resumes on its own: without "started" the migration is **uncertain** (guest paused here, state
`migrating`, stats status `uncertain`) until an operator calls `resolve`.

It must never: decrypt or log page contents or keys (it sees ciphertext for private pages and hands
plaintext shared pages straight to the wire), or block the event loop for long (a batch at a time).
"""

from __future__ import annotations

import os
import uuid

import structlog
import trio

from sevmigd.daemon.channel import Channel, run_channel
from sevmigd.kvm import KvmError
from sevmigd.units import PAGE_SIZE
from sevmigd.migrate.errors import MigrationError
from sevmigd.migrate.pages import pack_bitmap
from sevmigd.migrate.planner import Decision, PrecopyPlanner
from sevmigd.migrate.ram import RamSender
from sevmigd.migrate.ratelimit import TokenBucket
from sevmigd.migrate.stats import MigrationStats
from sevmigd.migrate.trust import check_channel_identity, check_peer_platform, platform_chip, platform_files
from sevmigd.psp.policy import Policy
from sevmigd.wire import SUPPORTED_FEATURES, Connection, Role
from sevmigd.wire import messages as m
from sevmigd.wire.errors import AbortCode

# How often the live statistics are pushed to a `progress` callback between round ends (the control
# socket's "progress" events): often enough to look live, rarely enough to cost nothing.
PROGRESS_INTERVAL_S = 0.5


def new_migration_id() -> str:
    return uuid.uuid4().hex[:16]


class OutgoingMigration:
    """One outgoing migration of `hosted` (a daemon HostedGuest) to the daemon at dest_host:dest_port.
    `self.host` is the guest's HostView (the hypervisor's side of the guest), never the destination."""

    def __init__(self, manager, hosted, dest_host: str, dest_port: int, *, downtime_limit_ms=None,
                 max_bandwidth_mib_s=None, progress=None, stream_factory=None, policy=None,
                 migration_id=None):
        self.manager = manager
        self.daemon = manager.daemon
        cfg = self.daemon.config
        self.hosted = hosted
        self.vm = hosted.vm
        self.host = self.vm.host
        self.addr = (dest_host, dest_port)
        self.downtime_limit_s = (cfg.downtime_limit_ms if downtime_limit_ms is None else downtime_limit_ms) / 1000
        mib_s = cfg.max_bandwidth_mib_s if max_bandwidth_mib_s is None else max_bandwidth_mib_s
        self.max_bandwidth = float(mib_s) * (1 << 20)
        self.progress = progress
        self.stream_factory = stream_factory  # tests: async () -> Stream, instead of TCP
        self.id = migration_id or new_migration_id()
        self.stats = MigrationStats(self.id, "source", f"{dest_host}:{dest_port}", hosted.name,
                                    total=self.vm.memory_bytes, started_at=trio.current_time())
        # Migration policy (config.MigrationPolicy or None): its timeouts are decided by the planner,
        # acted on by _policy_tick / the policy cancel scope in _protocol.
        self.policy = policy
        self.stats.policy = policy.name if policy is not None else None
        self.planner: PrecopyPlanner | None = None
        self._policy_scope = trio.CancelScope()
        self.channel: Channel | None = None
        self.pending_error: MigrationError | None = None
        self.scope = trio.CancelScope()
        self.log = self.daemon.log.bind(migration_id=self.id, guest=hosted.name, role="source")
        # progress of the firmware / guest state, for exact cleanup
        self.send_started = False   # SEND_START done: the PSP context is in SUPDATE (until finish/cancel)
        self.send_finished = False  # SEND_FINISH done: SENT
        self.dirty_log_on = False
        self.paused_by_us = False
        self.committed = False      # "go" may have reached the wire: no resuming on our own any more
        # Chip ids the destination's verified TLS certificate names; None on a plaintext channel, where no
        # message from the peer may make us release (Started) or resume after go (Abort): PROTOCOL.md §7.3.
        self.peer_platforms: frozenset[str] | None = None
        self.completed = False
        self.t_pause: float | None = None
        self.sev = self.host.sev                # SEV commands through KVM (sevmigd.kvm), QEMU's sev.c
        self.ram = RamSender(self.host, clock=trio.current_time)   # QEMU's ram.c: which pages, how
        # The page path: the batch extension (one PSP crossing per batch) or one
        # KVM_SEV_SEND_UPDATE_DATA per page as upstream KVM/QEMU (config sev_batch_pages).
        self._send_pages_fn = (self.sev.send_update_data_batch if cfg.sev_batch_pages
                               else self.sev.send_update_data_pages)
        self.pages_total = 0
        self._final_error: MigrationError | None = None
        self._last_progress = 0.0

    # -- control ---------------------------------------------------------------------------------------

    def cancel(self, err: MigrationError) -> bool:
        """Abort this migration with `err` unless the hand-off is committed. Returns False when too late."""
        if self.committed:
            return False
        if self.pending_error is None:
            self.pending_error = err
        if self.channel is not None:
            self.channel.fail_between_frames(err)
        else:
            self.scope.cancel()
        return True

    # -- run ---------------------------------------------------------------------------------------------

    async def run(self) -> dict:
        with structlog.contextvars.bound_contextvars(migration_id=self.id, guest=self.hosted.name):
            self.log.info("migration_started", peer=self.stats.peer, memory_bytes=self.vm.memory_bytes,
                          policy=hex(self.vm.policy), downtime_limit_ms=self.downtime_limit_s * 1000,
                          max_bandwidth_mib_s=self.max_bandwidth / (1 << 20))
            self.hosted.state = "migrating"
            stream = None
            try:
                with self.scope:
                    stream = await self._connect()
                if self.scope.cancelled_caught or stream is None:
                    raise self.pending_error or MigrationError(AbortCode.CANCELLED, "migration cancelled")
                self.peer_platforms = self.manager.peer_platforms(stream)
                if self.peer_platforms is None:
                    self.log.warning("plaintext_migration", peer=self.stats.peer,
                                     note="insecure_plaintext: the destination cannot prove which platform "
                                          "it is; the hand-off will end uncertain (compare session ids, "
                                          "then `ctl resolve`)")
                conn = Connection(Role.SOURCE, rng=os.urandom, limits=self.manager.wire_limits())
                await run_channel(stream, conn, self._protocol, peer=self.stats.peer,
                                  keepalive_interval_s=self.daemon.config.keepalive_interval_s,
                                  peer_timeout_s=self.daemon.config.peer_timeout_s, log=self.log,
                                  on_open=self._opened, on_failure=self._handle_failure)
            except MigrationError as err:
                await self._handle_failure(err)
                raise self._final_error from None
            except BaseException:
                # Cancelled from outside (daemon shutdown without cancel()) or a bug: still never lose it.
                await self._handle_failure(MigrationError(AbortCode.INTERNAL_ERROR, "migration interrupted"))
                raise
            return self.stats.to_dict()

    async def _handle_failure(self, err: MigrationError) -> None:
        """Once per migration: clean up after the first failure (called by the channel before it lingers
        on the close, or after run_channel when the failure came before the channel existed)."""
        if self._final_error is not None:
            return
        err = self.pending_error if (self.pending_error and not self.committed) else err
        self._final_error = await self._failed(err)

    def _opened(self, ch: Channel) -> None:
        self.channel = ch
        if self.pending_error is not None:
            ch.fail(self.pending_error)

    async def _connect(self):
        cfg = self.daemon.config
        dest_host, dest_port = self.addr
        with trio.move_on_after(cfg.handshake_timeout_s) as cs:
            try:
                if self.stream_factory is not None:
                    stream = await self.stream_factory()
                else:
                    stream = await trio.open_tcp_stream(dest_host, dest_port)
            except OSError as exc:
                raise MigrationError(AbortCode.INTERNAL_ERROR,
                                     f"destination {dest_host}:{dest_port} unreachable: {exc.strerror or exc}") from None
            stream = await self.manager.wrap_client_tls(stream, dest_host)
        if cs.cancelled_caught:
            raise MigrationError(AbortCode.TIMEOUT,
                                 f"destination {dest_host}:{dest_port} did not answer within {cfg.handshake_timeout_s:g} s")
        return stream

    # -- the protocol -------------------------------------------------------------------------------------

    def _bind_session(self, ch: Channel) -> None:
        """The channel's session_id (known once Accept is in) goes on every later log line and into
        the figures (`status`, `migrate --json`): operators compare it with the destination's."""
        sid = getattr(ch.conn, "session_id", None)
        if sid:
            self.stats.session_id = sid
            self.log = self.log.bind(session_id=sid)

    async def _protocol(self, ch: Channel) -> None:
        cfg = self.daemon.config
        vm = self.vm
        identity = self.daemon.sev_device.identity
        t_hello = trio.current_time()
        await ch.send(m.Hello(version=self.manager.protocol_version, features=SUPPORTED_FEATURES,
                              platform=platform_files(identity), guest_name=vm.name,
                              memory_bytes=vm.memory_bytes, policy=vm.policy, vcpus=self._vcpus(),
                              es=bool(vm.policy & Policy.ES), migration_id=self.id))
        reply = None
        with trio.move_on_after(cfg.handshake_timeout_s):
            reply = await ch.receive_expect(m.Accept, m.Refuse)
        # One measured round trip including the destination's processing of a message: the planner adds
        # it to the expected downtime for the hand-off's own exchange (Complete/Ready/Go/Started).
        handshake_rtt = trio.current_time() - t_hello
        if reply is None:
            raise MigrationError(AbortCode.TIMEOUT, f"destination {self.stats.peer} did not accept within "
                                                    f"{cfg.handshake_timeout_s:g} s")
        if isinstance(reply, m.Refuse):
            code = reply.code if isinstance(reply.code, AbortCode) else AbortCode.PROTOCOL_ERROR
            err = MigrationError(code, f"destination refused ({code.name}): {reply.reason}")
            ch.fail(err, tell_peer=False)
            raise err
        ch.start_keepalives()
        self._bind_session(ch)
        dest_id = check_peer_platform(reply.platform, who="destination",
                                      trusted_roots=self.daemon.trusted_roots,
                                      allowed_platforms=cfg.allowed_platforms,
                                      allowed_oca=await self.manager.allowed_oca())
        # Before SEND_START: the TLS peer must be the platform whose PDH the session will be wrapped to.
        check_channel_identity(self.peer_platforms, reply.platform, who="destination")
        self.log.info("destination_accepted", destination_platform=dest_id[:16])
        # The in-flight record (daemon/settle.py), durable before SEND_START: a restarted daemon knows the
        # session and which platform may answer for it.
        await self.manager.settle.outgoing_started(self, platform_chip(reply.platform))

        p = reply.platform
        policy, session = await self.daemon.psp.run(
            "SEND_START", lambda: self.sev.send_start(pdh_cert=p["pdh"], plat_certs=p["pek"] + p["oca"] + p["cek"],
                                                amd_certs=p["ask"] + p["ark"]))
        self.send_started = True
        own_pdh, _chain = self.daemon.sev_device.pdh_cert_export()
        await ch.send(m.Start(policy=policy, pdh=own_pdh, session=session))
        now = trio.current_time()
        self.stats.setup_time_ms = round((now - self.stats.started_at) * 1000, 3)
        self.stats.status = "active"
        await self._push_progress(force=True)

        planner = self.planner = PrecopyPlanner(PAGE_SIZE, self.downtime_limit_s, self.max_bandwidth,
                                                cfg.max_rounds, cfg.max_total_s, switchover_s=handshake_rtt,
                                                **self._policy_args())
        # max_total_s bounds the pre-copy as a whole, inside a round too (the planner only sees round
        # ends): on a collapsed link one round could otherwise last for hours with the guest dirtying on.
        limit = cfg.max_total_s
        with trio.CancelScope(deadline=trio.current_time() + limit if limit else float("inf")) as cs:
            self._policy_scope.deadline = planner.abort_deadline()
            with self._policy_scope:
                await self._precopy(ch, planner)
        if self._policy_scope.cancelled_caught:
            planner.timeout_decision()
            raise self._policy_error(planner)
        if cs.cancelled_caught:
            raise MigrationError(
                AbortCode.CONVERGENCE_FAILED,
                f"gave up after max_total_s = {limit:g} s of pre-copy: round {self.stats.round} still had "
                f"{self.stats.remaining} bytes to send (measured bandwidth "
                f"{planner.bandwidth / (1 << 20):.1f} MiB/s, {ch.bytes_sent} bytes sent so far)")
        await self._stop_and_copy(ch, planner)
        await self._handoff(ch)

    def _vcpus(self) -> int:
        return self.vm.vcpus

    async def _precopy(self, ch: Channel, planner: PrecopyPlanner) -> None:
        host = self.host
        ram = self.ram
        bucket = self.manager.rate_limiter(TokenBucket(self.max_bandwidth, now=trio.current_time()))
        ram.start()                     # dirty log on; round 1 sends every page
        self.dirty_log_on = True
        while True:
            wire_round = ch.conn.round
            rnd = self.stats.enter_round(wire_round)
            with structlog.contextvars.bound_contextvars(round=rnd):
                t0 = trio.current_time()
                npages = ram.round_pages
                sent, npriv, nshr = await self._send_round(ch, wire_round, bucket=bucket)
                unsent = ram.remaining      # pages of a round that force-complete cut short
                bitmap_s = ram.bitmap_s
                t_sync = trio.current_time()
                ndirty = ram.sync()         # the next round: the dirty log plus what was not sent
                sync_s = trio.current_time() - t_sync
                secs = trio.current_time() - t0
                rec = planner.round_done(sent, secs, ndirty)
                self._policy_scope.deadline = planner.abort_deadline()
                self.stats.remaining = ndirty * PAGE_SIZE
                self.stats.expected_downtime_ms = (None if rec.expected_downtime == float("inf")
                                                   else round(rec.expected_downtime * 1000, 3))
                self.stats.dirty_pages_rate = round(ndirty / secs, 1) if secs > 0 else 0.0
                await ch.send(m.RoundEnd(round=wire_round, pages=npages - unsent, remaining=ndirty + unsent))
                decision = planner.decision()
                summary = dict(round=rnd, pages=npages, private_pages=npriv, shared_pages=nshr,
                               bytes=sent, seconds=round(secs, 4), dirty_pages=ndirty,
                               bandwidth_mib_s=round(planner.bandwidth / (1 << 20), 1),
                               expected_downtime_ms=self.stats.expected_downtime_ms,
                               throttle_pct=planner.throttle_pct, decision=decision.value,
                               sync_ms=round(sync_s * 1000, 3), bitmap_ms=round(bitmap_s * 1000, 3))
                self.stats.rounds.append(summary)
                self.log.info("round_done", **summary)
                await self._push_progress(force=True)
                if decision is Decision.STOP_AND_COPY or decision is Decision.FORCE_COMPLETE or unsent:
                    # ram.py still holds the pages to send, guest paused (plus a round cut short)
                    if decision is not Decision.STOP_AND_COPY:
                        self.stats.forced_completion = True
                        self.log.warning("force_complete", reason=planner.timeout_reason,
                                         remaining=ram.round_pages * PAGE_SIZE)
                    return
                if decision is Decision.GIVE_UP:
                    raise self._policy_error(planner)
                if planner.throttle_pct != self.stats.throttle_pct:
                    host.set_throttle(planner.throttle_pct)
                    self.stats.throttle_pct = planner.throttle_pct
                    self.log.info("auto_converge_throttle", throttle_pct=planner.throttle_pct)

    async def _send_round(self, ch: Channel, rnd: int, *, bucket: TokenBucket | None = None) -> tuple[int, int, int]:
        """Send the round's pages as ram.py hands them out, batch by batch. Returns (bytes, npriv, nshr)."""
        ram = self.ram
        send_pages = self._send_pages_fn
        sent = npriv = nshr = 0
        while (batch := ram.next_batch()) is not None:
            enc, shr = batch.enc, batch.shr
            if len(enc):
                # Inline, not in a worker thread: the guest's vCPU task uses the same memory engine
                # (see sevmigd.daemon.psprunner.PSP_IN_THREAD).
                headers, data = await self.daemon.psp.run("SEND_UPDATE_DATA", lambda: send_pages(enc),
                                                          thread=False)
            else:
                headers = data = b""
            if bucket is not None:
                delay = bucket.reserve(len(data) + len(batch.shr_data) + len(headers), trio.current_time())
                if delay > 0:
                    await trio.sleep(delay)
            n = await ch.send_pages(rnd, enc, headers, data, shr, batch.shr_data)
            sent += n
            npriv += len(enc)
            nshr += len(shr)
            self.pages_total += len(batch)
            self.stats.transferred = ch.bytes_sent
            self.stats.private_pages += len(enc)
            self.stats.shared_pages += len(shr)
            self.stats.remaining = ram.remaining * PAGE_SIZE  # QEMU: what is still dirty in the bitmap
            await self._push_progress()
            if bucket is not None and self._policy_tick(ram.remaining):
                break
        return sent, npriv, nshr

    # -- migration policy hooks (issue 12; the decisions are the planner's) -----------------------------

    def _policy_args(self) -> dict:
        pol = self.policy
        if pol is None:
            return {}
        return dict(clock=trio.current_time, start=self.stats.started_at, auto_converge=pol.auto_converge,
                    completion_timeout_s=pol.completion_timeout_s(self.vm.memory_bytes),
                    completion_action=pol.completion_action, progress_timeout_s=pol.progress_timeout_s)

    def _policy_tick(self, left: int) -> bool:
        """After each pre-copy batch: feed round-1 progress, move the abort deadline, and say whether
        force-complete cuts this round short now (the rest of it, still in ram.py, goes in the
        stop-and-copy)."""
        planner = self.planner
        if planner is None or self.policy is None:
            return False
        planner.in_round(left * PAGE_SIZE)
        self._policy_scope.deadline = planner.abort_deadline()
        return bool(left) and planner.timeout_decision() is Decision.FORCE_COMPLETE

    def _policy_error(self, planner: PrecopyPlanner) -> MigrationError:
        code = AbortCode.TIMEOUT if planner.timeout_kind == "progress" else AbortCode.CONVERGENCE_FAILED
        return MigrationError(code, planner.give_up_reason())

    async def _stop_and_copy(self, ch: Channel, planner: PrecopyPlanner) -> None:
        host = self.host
        self.stats.status = "device"
        self.t_pause = trio.current_time()
        host.pause()
        self.paused_by_us = True
        # The pages the last pre-copy round left dirty (or unsent), plus whatever the guest wrote since
        # that sync, plus every page whose encryption status changed since it was last sent (ram.py).
        bits = self.ram.stop_and_copy()
        npages = self.ram.round_pages
        wire_round = ch.conn.round
        rnd = self.stats.enter_round(wire_round)
        with structlog.contextvars.bound_contextvars(round=rnd):
            t0 = trio.current_time()
            # The Bitmap opens stop-and-copy on the wire (the guest is paused from here on); the last
            # pages follow it, sent as the final bitmap says.
            await ch.send(m.Bitmap(npages=self.vm.npages, bits=pack_bitmap(bits)))
            sent, npriv, nshr = await self._send_round(ch, wire_round)
            await ch.send(m.RoundEnd(round=wire_round, pages=npages, remaining=0))
            if self.host.is_es:
                hdrs, pages = [], []
                for i in range(self.vm.vcpus):      # one SEND_UPDATE_VMSA per vCPU (its own VMSA page)
                    hdr, vmsa = await self.daemon.psp.run("SEND_UPDATE_VMSA",
                                                          lambda: self.sev.send_update_vmsa(i),
                                                          where=f"vCPU {i}")
                    hdrs.append(hdr)
                    pages.append(vmsa)
                await ch.send(m.VcpuState(regs=None, vmsa_header=b"".join(hdrs), vmsa=b"".join(pages)))
            else:
                regs = tuple(dict(r) for r in host.get_vcpu_state())
                await ch.send(m.VcpuState(regs=regs, vmsa_header=None, vmsa=None))
            await ch.send(m.Complete(pages_total=self.pages_total))
            self.stats.remaining = 0
            self.stats.transferred = ch.bytes_sent
            summary = dict(round=rnd, pages=npages, private_pages=npriv, shared_pages=nshr,
                           bytes=sent, seconds=round(trio.current_time() - t0, 4), dirty_pages=0,
                           flipped_pages=self.ram.flipped, decision="complete")
            self.stats.rounds.append(summary)
            self.log.info("stop_and_copy_sent", **summary)
        await self._push_progress(force=True)

    async def _handoff(self, ch: Channel) -> None:
        await ch.receive_expect(m.Ready)
        # "go_sent" is durable before Go can reach the wire (PROTOCOL.md §7.3 rule 2): a restarted daemon
        # then asks before it resumes (daemon/settle.py).
        await self.manager.settle.outgoing_go(self)
        await ch.send(m.Go(), on_write=self._commit)
        await ch.receive_expect(m.Started)
        if self.peer_platforms is None:
            await self._unauthenticated_started(ch)
            return
        now = trio.current_time()
        self.completed = True
        self.stats.downtime_ms = round((now - self.t_pause) * 1000, 3)
        self.stats.status = "completed"
        self.stats.transferred = ch.bytes_sent
        self.stats.tick(now)
        try:
            self._release()
        except Exception:  # noqa: BLE001 - the guest runs on the destination; a failed local release
            self.log.exception("release_failed")  # must not turn a completed migration into a failure
            self.hosted.state = "migrated"
        await self.manager.settle.persist_psp()
        await self.manager.settle.outgoing_settled(self, "released", "completed")
        self.log.info("migration_completed", total_time_ms=self.stats.total_time_ms,
                      downtime_ms=self.stats.downtime_ms, rounds=self.stats.round,
                      transferred=self.stats.transferred, throughput_mbps=self.stats.throughput_mbps,
                      private_pages=self.stats.private_pages, shared_pages=self.stats.shared_pages)
        await self._push_progress(force=True)

    async def _unauthenticated_started(self, ch: Channel) -> None:
        """Started over a plaintext channel: it may come from anyone who answered on the address (a fake
        destination needs only the real one's public chain), so it does not release our copy. The guest
        stays paused here, the migration is uncertain until the operator compares session ids and runs
        `ctl resolve` (PROTOCOL.md §7.3 rule 7)."""
        now = trio.current_time()
        self.stats.downtime_ms = round((now - self.t_pause) * 1000, 3)
        self.stats.transferred = ch.bytes_sent
        self.stats.tick(now)
        self.stats.status = "uncertain"
        session = ch.conn.session_id
        self.stats.fail("UNTRUSTED_PLATFORM",
                        f"plaintext hand-off: 'started' came over an unauthenticated channel, so guest "
                        f"{self.hosted.name!r} is kept paused here. If `sevmigd ctl status {self.hosted.name}` "
                        f"on {self.stats.peer} shows it running with session {session}, run "
                        f"`sevmigd ctl resolve {self.hosted.name} --discard` here; otherwise `--run-here`.")
        self.manager.mark_uncertain(self.hosted.name, self)
        self.log.warning("migration_uncertain", reason="plaintext_started", session_id=session,
                         total_time_ms=self.stats.total_time_ms, downtime_ms=self.stats.downtime_ms)
        await self._push_progress(force=True)

    def _commit(self) -> None:
        """Called by the channel just before "go" may reach the wire: from here on we never resume alone."""
        self.committed = True

    def _release(self) -> None:
        """The destination runs the guest: SEND_FINISH (SUPDATE -> SENT), then drop ours (DECOMMISSION,
        RAM freed) and show it as migrated."""
        try:
            self.hosted.stop_vcpus()
        except Exception:  # noqa: BLE001 - the release below matters more than a stop that failed
            self.log.exception("stop_vcpus_failed")
        if self.send_started and not self.send_finished:
            try:
                self.sev.send_finish()
                self.send_finished = True
            except KvmError as exc:  # DECOMMISSION below ends the context either way
                self.log.error("send_finish_failed", error=str(exc))
        self.vm.release()
        self.hosted.state = "migrated"

    # -- failure paths -------------------------------------------------------------------------------------

    async def _failed(self, err: MigrationError) -> MigrationError:
        """Shielded cleanup after a failure; returns the error to raise to the caller."""
        with trio.CancelScope(shield=True):
            self.stats.tick(trio.current_time())
            if self.completed:
                # The destination runs the guest: whatever failed after "started" (our local clean-up)
                # must never bring the source copy back.
                self.log.error("post_handoff_cleanup_failed", error=str(err))
                return err
            handoff = self.channel.conn.handoff if self.channel is not None else "source"
            if self.committed and handoff == "source" and self.peer_platforms is None:
                # Rule 6 needs an Abort authenticated as the destination platform; over plaintext a forged
                # Abort after go could be hiding a guest that already runs there (PROTOCOL.md §7.3 rule 7).
                handoff = "uncertain"
            if self.committed and not self.completed and handoff == "source":
                # The destination aborted in state GO: its authenticated promise that it did not and will
                # not start the guest (PROTOCOL.md §7.3). The guest is ours again.
                self.log.warning("destination_renounced_after_go", error=str(err))
            if self.committed and not self.completed and handoff != "source":
                self.stats.status = "uncertain"
                self.stats.fail(err.code.name, f"hand-off uncertain: {err}")
                self.manager.mark_uncertain(self.hosted.name, self)
                # Authenticated channel: ask the destination until it answers (daemon/settle.py).
                asking = self.manager.settle.start_settling(self)
                then = (f"it is being asked (settlement query, session {self.stats.session_id}) and this "
                        f"settles by itself once {self.stats.peer} answers; if it cannot be reached, check there: "
                        if asking else "check there: ")
                msg = (f"hand-off of guest {self.hosted.name!r} is uncertain: 'go' was sent but 'started' did not "
                       f"come back ({err}). The guest is paused here and may be running on {self.stats.peer}; "
                       f"{then}if it runs there, `sevmigd ctl resolve {self.hosted.name} --discard` here, "
                       f"otherwise `sevmigd ctl resolve {self.hosted.name} --run-here`.")
                self.log.error("migration_uncertain", error=str(err), code=err.code.name, settling=asking)
                await self._push_progress(force=True)
                return MigrationError(err.code, msg)
            self._rollback(err)
            # SEND_CANCEL ran outside psp.run: the PSP's saved context must say RUNNING before the record
            # says resumed (a daemon restarting now adopts a guest that can migrate again).
            await self.manager.settle.persist_psp()
            await self.manager.settle.outgoing_settled(self, "resumed", "rolled_back")
            self.stats.status = "cancelled" if err.code in (AbortCode.CANCELLED, AbortCode.SHUTDOWN) else "failed"
            self.stats.fail(err.code.name, str(err))
            self.log.warning("migration_failed", error=str(err), code=err.code.name,
                             status=self.stats.status, rounds=self.stats.round,
                             transferred=self.stats.transferred)
            await self._push_progress(force=True)
            return err

    def _rollback(self, err: MigrationError) -> None:
        """Give the guest back to the source: SEND_CANCEL, throttle off, dirty log off, resume."""
        host = self.host
        if self.send_started and not self.send_finished:
            try:
                self.sev.send_cancel()
            except KvmError as exc:
                self.log.error("send_cancel_failed", error=str(exc))
            self.send_started = False
        for what, fn in (("throttle off", lambda: host.set_throttle(0)),
                         ("dirty log off", self.ram.stop_logging if self.dirty_log_on else None),
                         ("resume", host.resume if self.paused_by_us else None)):
            if fn is None:
                continue
            try:
                fn()
            except Exception:  # noqa: BLE001 - keep going: the guest must end up running
                self.log.exception("rollback_step_failed", step=what)
        self.hosted.state = "running"

    async def _push_progress(self, *, force: bool = False) -> None:
        now = trio.current_time()
        if not force and now - self._last_progress < PROGRESS_INTERVAL_S:
            return
        self._last_progress = now
        self.stats.tick(now)
        if self.channel is not None:
            self.stats.transferred = self.channel.bytes_sent
        if self.progress is None:
            return
        try:
            self.progress(self.stats.to_dict())
        except Exception:  # noqa: BLE001 - a broken progress listener must not break the migration
            self.log.exception("progress_callback_failed")
            self.progress = None
