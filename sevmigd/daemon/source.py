"""Source side of a live migration: one `OutgoingMigration` per guest being sent.

Owns the outgoing protocol run over a `Channel`: handshake (Hello / Accept, destination chain verified
against our trusted roots), SEND_START, pre-copy rounds with the guest running (round 1 every page, later
rounds the pages the dirty log reports; private pages through SEND_UPDATE_DATA, shared pages as they are),
convergence as the pure planner decides it (QEMU's rule, auto-converge, give-up), stop-and-copy (pause,
last dirty pages, final page-encryption bitmap, vCPU state or the SEV-ES VMSA through SEND_UPDATE_VMSA),
and the hand-off: Ready -> Go -> Started -> SEND_FINISH -> release.

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

import numpy as np
import structlog
import trio

from sevmigd.daemon.channel import Channel, run_channel
from sevmigd.guest.hypervisor import PAGE_SIZE
from sevmigd.migrate.errors import MigrationError
from sevmigd.migrate.pages import BATCH_PAGES, batches, pack_bitmap, split_by_encryption
from sevmigd.migrate.planner import Decision, PrecopyPlanner
from sevmigd.migrate.ratelimit import TokenBucket
from sevmigd.migrate.stats import MigrationStats
from sevmigd.migrate.trust import check_peer_platform, platform_files
from sevmigd.psp.policy import Policy
from sevmigd.psp.status import SevError
from sevmigd.wire import SUPPORTED_FEATURES, Connection, Role
from sevmigd.wire import messages as m
from sevmigd.wire.errors import AbortCode

# How often the live statistics are pushed to a `progress` callback between round ends (the control
# socket's "progress" events): often enough to look live, rarely enough to cost nothing.
PROGRESS_INTERVAL_S = 0.5


# How stale the page-encryption bitmap may be while pages are sent with the guest running. The copy is
# one byte per page (2 MiB for 8 GiB), so reading it for every 1 MiB batch would cost more than the batch
# on big guests; a page that flips in between goes out as what it was, and is sent again as what it is
# (the final stop-and-copy resends every page whose status differs from how it was last sent).
BITMAP_REFRESH_S = 0.05


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
        self.stats.policy = getattr(policy, "name", None)
        self.planner: PrecopyPlanner | None = None
        self.unsent = np.zeros(0, dtype=np.int64)  # pages of a round cut short by force-complete
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
        self.completed = False
        self.t_pause: float | None = None
        self.sent_private = np.zeros(self.vm.npages, dtype=bool)  # how each page was last sent
        self.pages_total = 0
        self.pending = np.zeros(0, dtype=np.int64)
        self._final_error: MigrationError | None = None
        self._bitmap_s = 0.0  # time spent reading the page-encryption bitmap in the current round
        self._last_progress = 0.0

    # -- control ---------------------------------------------------------------------------------------

    def cancel(self, err: MigrationError) -> bool:
        """Abort this migration with `err` unless the hand-off is committed. Returns False when too late."""
        if self.committed:
            return False
        if self.pending_error is None:
            self.pending_error = err
        if self.channel is not None:
            self.channel.fail(err)
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

    async def _protocol(self, ch: Channel) -> None:
        cfg = self.daemon.config
        fw = self.daemon.fw
        vm = self.vm
        identity = fw.identity
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
        dest_id = check_peer_platform(reply.platform, who="destination",
                                      trusted_roots=self.daemon.trusted_roots,
                                      allowed_platforms=cfg.allowed_platforms,
                                      allowed_oca=await self.manager.allowed_oca())
        self.log.info("destination_accepted", destination_platform=dest_id[:16])

        p = reply.platform
        policy, session = await self.daemon.psp.run(
            "SEND_START", lambda: fw.send_start(vm.handle, pdh_cert=p["pdh"], plat_certs=p["pek"] + p["oca"] + p["cek"],
                                                amd_certs=p["ask"] + p["ark"]))
        self.send_started = True
        own_pdh, _chain = fw.pdh_cert_export()
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
        bucket = self.manager.rate_limiter(TokenBucket(self.max_bandwidth, now=trio.current_time()))
        host.enable_dirty_log()
        self.dirty_log_on = True
        # Round 1 sends every page: a range, made into arrays one batch at a time (an int64 array of all
        # pfns would be 8 B per page of peak RSS: 16 MiB for an 8 GiB guest).
        pfns = range(self.vm.npages)
        while True:
            wire_round = ch.conn.round
            rnd = self.stats.enter_round(wire_round)
            with structlog.contextvars.bound_contextvars(round=rnd):
                t0 = trio.current_time()
                self._bitmap_s = 0.0
                sent, npriv, nshr = await self._send_pages(ch, wire_round, pfns, bucket=bucket)
                t_sync = trio.current_time()
                dirty = host.get_and_clear_dirty_log()
                sync_s = trio.current_time() - t_sync
                secs = trio.current_time() - t0
                rec = planner.round_done(sent, secs, len(dirty))
                self._policy_scope.deadline = planner.abort_deadline()
                self.stats.remaining = len(dirty) * PAGE_SIZE
                self.stats.expected_downtime_ms = (None if rec.expected_downtime == float("inf")
                                                   else round(rec.expected_downtime * 1000, 3))
                self.stats.dirty_pages_rate = round(len(dirty) / secs, 1) if secs > 0 else 0.0
                await ch.send(m.RoundEnd(round=wire_round, pages=len(pfns) - len(self.unsent),
                                         remaining=len(dirty) + len(self.unsent)))
                decision = planner.decision()
                summary = dict(round=rnd, pages=int(len(pfns)), private_pages=npriv, shared_pages=nshr,
                               bytes=sent, seconds=round(secs, 4), dirty_pages=int(len(dirty)),
                               bandwidth_mib_s=round(planner.bandwidth / (1 << 20), 1),
                               expected_downtime_ms=self.stats.expected_downtime_ms,
                               throttle_pct=planner.throttle_pct, decision=decision.value,
                               sync_ms=round(sync_s * 1000, 3), bitmap_ms=round(self._bitmap_s * 1000, 3))
                self.stats.rounds.append(summary)
                self.log.info("round_done", **summary)
                await self._push_progress(force=True)
                if decision is Decision.STOP_AND_COPY or decision is Decision.FORCE_COMPLETE or len(self.unsent):
                    # still to send, guest paused (plus a round that force-complete cut short)
                    self.pending = np.union1d(np.asarray(dirty, dtype=np.int64), self.unsent)
                    if decision is not Decision.STOP_AND_COPY:
                        self.stats.forced_completion = True
                        self.log.warning("force_complete", reason=planner.timeout_reason,
                                         remaining=int(len(self.pending)) * PAGE_SIZE)
                    return
                if decision is Decision.GIVE_UP:
                    raise self._policy_error(planner)
                if planner.throttle_pct != self.stats.throttle_pct:
                    host.set_throttle(planner.throttle_pct)
                    self.stats.throttle_pct = planner.throttle_pct
                    self.log.info("auto_converge_throttle", throttle_pct=planner.throttle_pct)
                pfns = np.asarray(dirty, dtype=np.int64)

    async def _send_pages(self, ch: Channel, rnd: int, pfns: np.ndarray | range, *, bucket: TokenBucket | None = None,
                          private: np.ndarray | None = None) -> tuple[int, int, int]:
        """Send `pfns` in batches. `private` fixes the bitmap (stop-and-copy); otherwise it is re-read
        every BITMAP_REFRESH_S while the guest runs. Returns (bytes, npriv, nshr)."""
        fw = self.daemon.fw
        handle = self.vm.handle
        host = self.host
        sent = npriv = nshr = 0
        left = len(pfns)
        bits = private
        bits_at = -BITMAP_REFRESH_S
        for chunk in batches(pfns, BATCH_PAGES):
            if isinstance(chunk, range):
                chunk = np.arange(chunk.start, chunk.stop, dtype=np.int64)
            if private is None and trio.current_time() - bits_at >= BITMAP_REFRESH_S:
                bits_at = trio.current_time()
                bits = host.page_enc_bitmap()
                self._bitmap_s += trio.current_time() - bits_at
            enc, shr = split_by_encryption(chunk, bits)
            if len(enc):
                # Inline, not in a worker thread: the guest's vCPU task uses the same memory engine
                # (see sevmigd.daemon.psprunner.PSP_IN_THREAD).
                headers, data = await self.daemon.psp.run(
                    "SEND_UPDATE_DATA", lambda: fw.send_update_data_batch(handle, enc), thread=False)
            else:
                headers = data = b""
            shr_data = host.read_raw_pages(shr) if len(shr) else b""
            self.sent_private[enc.astype(np.int64)] = True
            self.sent_private[shr.astype(np.int64)] = False
            if bucket is not None:
                delay = bucket.reserve(len(data) + len(shr_data) + len(headers), trio.current_time())
                if delay > 0:
                    await trio.sleep(delay)
            n = await ch.send_pages(rnd, enc, headers, data, shr, shr_data)
            sent += n
            npriv += len(enc)
            nshr += len(shr)
            self.pages_total += len(chunk)
            self.stats.transferred = ch.bytes_sent
            self.stats.private_pages += len(enc)
            self.stats.shared_pages += len(shr)
            left -= len(chunk)
            self.stats.remaining = left * PAGE_SIZE  # QEMU: what is still dirty in the bitmap
            await self._push_progress()
            if bucket is not None and self._policy_tick(pfns, left):
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

    def _policy_tick(self, pfns, left: int) -> bool:
        """After each pre-copy batch: feed round-1 progress, move the abort deadline, and say whether
        force-complete cuts this round short now (the rest of it goes in the stop-and-copy)."""
        planner = self.planner
        if planner is None or self.policy is None:
            return False
        planner.in_round(left * PAGE_SIZE)
        self._policy_scope.deadline = planner.abort_deadline()
        if left and planner.timeout_decision() is Decision.FORCE_COMPLETE:
            self.unsent = np.asarray(pfns[len(pfns) - left:], dtype=np.int64)
            return True
        return False

    def _policy_error(self, planner: PrecopyPlanner) -> MigrationError:
        code = AbortCode.TIMEOUT if planner.timeout_kind == "progress" else AbortCode.CONVERGENCE_FAILED
        return MigrationError(code, planner.give_up_reason())

    async def _stop_and_copy(self, ch: Channel, planner: PrecopyPlanner) -> None:
        host = self.host
        fw = self.daemon.fw
        self.stats.status = "device"
        self.t_pause = trio.current_time()
        host.pause()
        self.paused_by_us = True
        # The pages the last pre-copy round left dirty, plus whatever the guest wrote since that sync.
        dirty = np.union1d(self.pending, np.asarray(host.get_and_clear_dirty_log(), dtype=np.int64))
        bits = np.asarray(host.page_enc_bitmap(), dtype=bool).copy()
        # Pages whose encryption status changed since they were last sent must go again as what they are
        # now, even if the guest did not write them (the final bitmap decides how the destination reads).
        flipped = np.nonzero(self.sent_private != bits)[0]
        pfns = np.union1d(dirty, flipped).astype(np.int64)
        wire_round = ch.conn.round
        rnd = self.stats.enter_round(wire_round)
        with structlog.contextvars.bound_contextvars(round=rnd):
            t0 = trio.current_time()
            # The Bitmap opens stop-and-copy on the wire (the guest is paused from here on); the last
            # pages follow it, sent as the final bitmap says.
            await ch.send(m.Bitmap(npages=self.vm.npages, bits=pack_bitmap(bits)))
            sent, npriv, nshr = await self._send_pages(ch, wire_round, pfns, private=bits)
            await ch.send(m.RoundEnd(round=wire_round, pages=len(pfns), remaining=0))
            if self.host.is_es:
                hdrs, pages = [], []
                for i in range(self.vm.vcpus):      # one SEND_UPDATE_VMSA per vCPU (its own VMSA page)
                    hdr, vmsa = await self.daemon.psp.run("SEND_UPDATE_VMSA",
                                                          lambda: fw.send_update_vmsa(self.vm.handle, vcpu=i),
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
            summary = dict(round=rnd, pages=int(len(pfns)), private_pages=npriv, shared_pages=nshr,
                           bytes=sent, seconds=round(trio.current_time() - t0, 4), dirty_pages=0,
                           flipped_pages=int(len(flipped)), decision="complete")
            self.stats.rounds.append(summary)
            self.log.info("stop_and_copy_sent", **summary)
        await self._push_progress(force=True)

    async def _handoff(self, ch: Channel) -> None:
        await ch.receive_expect(m.Ready)
        await ch.send(m.Go(), on_write=self._commit)
        await ch.receive_expect(m.Started)
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
        self.log.info("migration_completed", total_time_ms=self.stats.total_time_ms,
                      downtime_ms=self.stats.downtime_ms, rounds=self.stats.round,
                      transferred=self.stats.transferred, throughput_mbps=self.stats.throughput_mbps,
                      private_pages=self.stats.private_pages, shared_pages=self.stats.shared_pages)
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
                self.daemon.fw.send_finish(self.vm.handle)
                self.send_finished = True
            except SevError as exc:  # DECOMMISSION below ends the context either way
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
            if self.committed and not self.completed and handoff == "source":
                # The destination aborted in state GO: its authenticated promise that it did not and will
                # not start the guest (PROTOCOL.md §7.3). The guest is ours again.
                self.log.warning("destination_renounced_after_go", error=str(err))
            if self.committed and not self.completed and handoff != "source":
                self.stats.status = "uncertain"
                self.stats.fail(err.code.name, f"hand-off uncertain: {err}")
                self.manager.mark_uncertain(self.hosted.name, self)
                msg = (f"hand-off of guest {self.hosted.name!r} is uncertain: 'go' was sent but 'started' did not "
                       f"come back ({err}). The guest is paused here and may be running on {self.stats.peer}; "
                       f"check there: if it runs there, `sevmigd ctl resolve {self.hosted.name} --discard` here, "
                       f"otherwise `sevmigd ctl resolve {self.hosted.name} --run-here`.")
                self.log.error("migration_uncertain", error=str(err), code=err.code.name)
                await self._push_progress(force=True)
                return MigrationError(err.code, msg)
            self._rollback(err)
            self.stats.status = "cancelled" if err.code in (AbortCode.CANCELLED, AbortCode.SHUTDOWN) else "failed"
            self.stats.fail(err.code.name, str(err))
            self.log.warning("migration_failed", error=str(err), code=err.code.name,
                             status=self.stats.status, rounds=self.stats.round,
                             transferred=self.stats.transferred)
            await self._push_progress(force=True)
            return err

    def _rollback(self, err: MigrationError) -> None:
        """Give the guest back to the source: SEND_CANCEL, throttle off, dirty log off, resume."""
        fw = self.daemon.fw
        host = self.host
        if self.send_started and not self.send_finished:
            try:
                fw.send_cancel(self.vm.handle)
            except SevError as exc:
                self.log.error("send_cancel_failed", error=str(exc))
            self.send_started = False
        for what, fn in (("throttle off", lambda: host.set_throttle(0)),
                         ("dirty log off", host.disable_dirty_log if self.dirty_log_on else None),
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
