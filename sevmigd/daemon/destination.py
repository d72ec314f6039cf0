"""Destination side of a live migration: one `IncomingMigration` per accepted connection.

Owns the incoming protocol run over a `Channel`: the handshake limits (max_incoming, max_guest_bytes, a
guest of that name already here -> GUEST_EXISTS, the source chain verified against our trusted roots and
allowed_platforms / allowed_oca) decided **before any memory is reserved**; the incoming VM (`SevVm.incoming`:
KVM_SEV_INIT with an ASID of the guest's kind, its memory slot), then RECEIVE_START through it (KVM binds
the ASID), registered with state `incoming`; every Pages batch applied as it arrives (private pages
through RECEIVE_UPDATE_DATA, shared pages stored as they are by migrate/ram.py); the page-encryption
bitmap written once from the final Bitmap, into KVM's bitmap and the VMM's, so the guest continues with
either hypercall dialect; vCPU state (registers, or the SEV-ES VMSAs through RECEIVE_UPDATE_VMSA);
RECEIVE_FINISH -> Ready; and on Go only: start the guest, register it running, start its vCPU task,
answer Started. Every SEV command goes through `sevmigd.kvm` (`SevGuest`), as QEMU's target/i386/sev.c
issues it to /dev/kvm; `sev_batch_pages` picks the batch extension or one ioctl per page.

It must never start a guest without "go", and never keep a partial one: any failure or end of stream
before "go" DECOMMISSIONs the context and drops the guest (shielded). It never sees a private page's
plaintext (the firmware writes it into guest memory under the guest's new key).
"""

from __future__ import annotations

import os

import structlog
import trio

from sevmigd.daemon.channel import Channel, run_channel
from sevmigd.daemon.slots import hello_accepted
from sevmigd.limits import guest_name_problem
from sevmigd.kvm import KvmError, SevGuest
from sevmigd.units import PAGE_SIZE
from sevmigd.migrate.errors import MigrationError
from sevmigd.migrate.pages import unpack_bitmap
from sevmigd.migrate.ram import RamReceiver, as_pfns
from sevmigd.migrate.stats import MigrationStats
from sevmigd.migrate.trust import check_channel_identity, check_peer_platform, platform_chip, platform_files
from sevmigd.psp.policy import Policy
from sevmigd.wire import SUPPORTED_FEATURES, Connection, Role, negotiate_version
from sevmigd.wire import messages as m
from sevmigd.wire.errors import AbortCode, ProtocolError
from sevmigd.wire.limits import SEV_HDR_SIZE

from sevmigd.daemon.source import PROGRESS_INTERVAL_S

# The incoming guest's RAM is prefaulted in a worker thread (first-touch page faults off the loop that
# applies pages: measured 1 GiB shared 2.95 -> 1.50 s, destination 11.2 -> 6.3 us/page), but only a bounded
# step ahead of the pages that arrived (issue 11): memory is committed as pages arrive, so a peer that
# announces a large guest and then sends little costs the host at most this much beyond what it sent.
POPULATE_INCOMING = True
POPULATE_AHEAD_BYTES = 128 << 20
# The prefault thread is woken at most once per this many bytes of newly allowed RAM (or at the end), not
# after every 1 MiB batch: each worker-thread hop costs the trio loop a thread hand-off (and the kernel a
# futex wake and a thread rename), ~1 per batch before (strace: 216 prctl + 754 futex for 256 MiB).
POPULATE_STEP_BYTES = 32 << 20


def physical_memory_bytes() -> int | None:
    """The host's RAM (sysconf), the default budget of memory being received; None when unknown."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


class IncomingMigration:
    """One incoming connection from a source daemon at `peer`."""

    def __init__(self, manager, stream: trio.abc.Stream, peer: str):
        self.manager = manager
        self.daemon = manager.daemon
        self.stream = stream
        self.peer = peer
        self.name: str | None = None
        self.id = "?"
        self.stats = MigrationStats("?", "destination", peer, "?", started_at=trio.current_time())
        self.channel: Channel | None = None
        self.log = self.daemon.log.bind(role="destination", peer=peer)
        self.reserved = False
        self.handle: int | None = None
        self.sev: SevGuest | None = None         # the incoming VM's SEV commands (sevmigd.kvm)
        self.ram: RamReceiver | None = None      # its RAM (migrate/ram.py)
        self.asid: int | None = None
        self.vm = None
        self.hosted = None
        self.started = False
        self.ready = False
        self.npages = 0
        self.pages_received = 0
        self.refused = False
        self.memory_bytes = 0  # announced in Hello; counts against max_incoming_bytes while reserved
        self._populate_stop = False
        self._pages_arrived = trio.Event()
        self._failure_handled = False
        self.pending_error: MigrationError | None = None
        self._last_progress = 0.0
        # Chip ids the source's verified TLS certificate names; None on a plaintext channel.
        self.peer_platforms: frozenset[str] | None = manager.peer_platforms(stream)
        self.record = None   # the durable in-flight record (daemon/settle.py), from RECEIVE_START on
        self.source_chip: str | None = None

    def cancel(self, err: MigrationError) -> bool:
        if self.started:
            return False
        if self.pending_error is None:
            self.pending_error = err
        if self.channel is not None:
            self.channel.fail(err)
        return True

    async def run(self) -> None:
        cfg = self.daemon.config
        conn = Connection(Role.DESTINATION, rng=os.urandom, limits=self.manager.wire_limits())
        try:
            await run_channel(self.stream, conn, self._protocol, peer=self.peer,
                              keepalive_interval_s=cfg.keepalive_interval_s, peer_timeout_s=cfg.peer_timeout_s,
                              log=self.log, on_open=self._opened, on_failure=self._failed)
        except MigrationError as err:
            await self._failed(err)
        except BaseException:
            await self._failed(MigrationError(AbortCode.INTERNAL_ERROR, "migration interrupted"))
            raise
        finally:
            if self.reserved:
                self.manager.incoming.pop(self.name, None)
            if self.name is not None:
                self.manager.record_finished(self.stats)

    def _opened(self, ch: Channel) -> None:
        self.channel = ch
        if self.pending_error is not None:
            ch.fail(self.pending_error)

    # -- handshake ------------------------------------------------------------------------------------------

    def _name_refusal(self, hello: m.Hello) -> MigrationError | None:
        """The one guest-name rule (sevmigd.limits), as for `launch`: a name outside it is a
        malformed Hello field (PROTOCOL.md §5.1), refused before anything is looked up or reserved."""
        problem = guest_name_problem(hello.guest_name)
        if problem is not None:
            return MigrationError(AbortCode.PROTOCOL_ERROR, f"guest_name: {problem}")
        problem = guest_name_problem(hello.migration_id)
        if problem is not None:
            return MigrationError(AbortCode.PROTOCOL_ERROR, f"migration_id: {problem.replace('guest names', 'ids')}")
        return None

    async def _refusal(self, hello: m.Hello) -> MigrationError | None:
        """Why we will not take this guest, or None. Decided before anything is reserved."""
        cfg = self.daemon.config
        d = self.daemon
        if d.shutting_down:
            return MigrationError(AbortCode.SHUTDOWN, "destination daemon is shutting down")
        if negotiate_version(hello.version) is None:
            return MigrationError(AbortCode.VERSION_MISMATCH,
                                  f"protocol version {hello.version} not supported "
                                  f"(this daemon speaks {self.manager.protocol_version})")
        if hello.memory_bytes > cfg.max_guest_bytes:
            return MigrationError(AbortCode.RESOURCE_LIMIT,
                                  f"guest of {hello.memory_bytes} bytes exceeds max_guest_bytes = {cfg.max_guest_bytes}")
        if hello.es != bool(hello.policy & Policy.ES):
            # The Connection holds VcpuState to Hello's `es` (registers or one VMSA per vCPU); this holds
            # `es` to the policy the firmware will enforce.
            return MigrationError(AbortCode.PROTOCOL_ERROR, f"es={hello.es} contradicts policy {hello.policy:#x}")
        # What the guest layer would refuse after RECEIVE_START (vCPUs, a size below its minimum).
        problem = self.manager.incoming_guest_problem(memory_bytes=hello.memory_bytes, policy=hello.policy,
                                                      vcpus=hello.vcpus)
        if problem is not None:
            return MigrationError(AbortCode.RESOURCE_LIMIT, f"this destination cannot host the guest: {problem}")
        refusal = self._capacity_refusal(hello)
        if refusal is not None:
            return refusal
        try:
            pid = check_peer_platform(hello.platform, who="source", trusted_roots=d.trusted_roots,
                                      allowed_platforms=cfg.allowed_platforms,
                                      allowed_oca=await self.manager.allowed_oca())
            # The TLS peer must be the platform whose chain (and so whose PDH) it presents.
            check_channel_identity(self.peer_platforms, hello.platform, who="source")
        except MigrationError as err:
            return err
        self.source_chip = platform_chip(hello.platform)
        self.log.info("source_platform_verified", source_platform=pid[:16],
                      channel="plaintext" if self.peer_platforms is None else "tls")
        return None

    def _capacity_refusal(self, hello: m.Hello) -> MigrationError | None:
        """What other sessions hold (slots, the memory budget, the name). Synchronous: checked again
        right before the name is reserved, with no checkpoint in between, because `_refusal` awaits
        (the allowed OCAs are read in a thread) and another Hello may have been accepted meanwhile."""
        cfg = self.daemon.config
        if len(self.manager.incoming) >= cfg.max_incoming:
            return MigrationError(AbortCode.RESOURCE_LIMIT,
                                  f"destination already receives {len(self.manager.incoming)} guests "
                                  f"(max_incoming = {cfg.max_incoming})")
        budget = cfg.max_incoming_bytes if cfg.max_incoming_bytes is not None else physical_memory_bytes()
        receiving = sum(mig.memory_bytes for mig in self.manager.incoming.values())
        if budget is not None and receiving + hello.memory_bytes > budget:
            which = "max_incoming_bytes" if cfg.max_incoming_bytes is not None else \
                "max_incoming_bytes (default: this host's memory)"
            return MigrationError(AbortCode.RESOURCE_LIMIT,
                                  f"guest of {hello.memory_bytes} bytes with {receiving} bytes already being "
                                  f"received exceeds {which} = {budget}")
        existing = self.daemon.guests.get(hello.guest_name)
        if hello.guest_name in self.manager.incoming or (
                existing is not None and existing.state not in self.manager.REPLACEABLE_STATES):
            return MigrationError(AbortCode.GUEST_EXISTS,
                                  f"a guest named {hello.guest_name!r} already exists on the destination")
        return None

    async def _protocol(self, ch: Channel) -> None:
        cfg = self.daemon.config
        hello = None
        with trio.move_on_after(cfg.handshake_timeout_s):
            hello = await ch.receive_expect(m.Hello, m.Query)
        if hello is None:
            raise MigrationError(AbortCode.TIMEOUT, f"no hello from {self.peer} within {cfg.handshake_timeout_s:g} s")
        if isinstance(hello, m.Query):
            # A settlement connection (PROTOCOL.md §7.6), not a migration: answered by daemon/settle.py.
            await self.manager.settle.serve_query(ch, hello, self.peer_platforms, self.peer)
            return
        # Until the name rule has passed, the peer's strings are logged escaped (ascii()), never as they are.
        name_ok = guest_name_problem(hello.guest_name) is None
        self.id = hello.migration_id if guest_name_problem(hello.migration_id) is None else ascii(hello.migration_id[:80])
        self.name = hello.guest_name if name_ok else None
        shown = hello.guest_name if name_ok else ascii(hello.guest_name[:80])
        self.stats = MigrationStats(self.id, "destination", self.peer, shown,
                                    total=hello.memory_bytes, started_at=self.stats.started_at)
        self.log = self.log.bind(migration_id=self.id, guest=shown)
        structlog.contextvars.bind_contextvars(migration_id=self.id, guest=shown)
        refusal = self._name_refusal(hello) or await self._refusal(hello) or self._capacity_refusal(hello)
        if refusal is not None:
            self.log.warning("incoming_refused", code=refusal.code.name, reason=str(refusal))
            self.refused = True
            await ch.send(m.Refuse(refusal.code, str(refusal)[:1000]))
            ch.fail(MigrationError(refusal.code, f"refused: {refusal}"), tell_peer=False)
            raise ch.failure
        # Reserve the name (no checkpoint since the checks above), then answer.
        self.manager.incoming[self.name] = self
        self.reserved = True
        self.memory_bytes = hello.memory_bytes
        hello_accepted()  # a session now: no longer evictable as a pre-Hello connection
        await ch.send(m.Accept(version=negotiate_version(hello.version), features=SUPPORTED_FEATURES,
                               platform=platform_files(self.daemon.sev_device.identity)))
        ch.start_keepalives()
        sid = getattr(ch.conn, "session_id", None)
        if sid:
            self.stats.session_id = sid
            self.log = self.log.bind(session_id=sid)
        self.log.info("incoming_accepted", memory_bytes=hello.memory_bytes, policy=hex(hello.policy),
                      vcpus=hello.vcpus, es=hello.es)

        if self.peer_platforms is None:
            self.log.warning("plaintext_migration", peer=self.peer,
                             note="insecure_plaintext: the source's identity is not authenticated")
        # Start within start_timeout_s of Accept; keepalives do not count (they would let a peer hold a
        # slot and the guest's name forever). The reservation ends with the session.
        start = None
        with trio.move_on_after(cfg.start_timeout_s):
            start = await ch.receive_expect(m.Start)   # (its policy equals Hello's: the Connection checked)
        if start is None:
            raise MigrationError(AbortCode.TIMEOUT, f"no start from {self.peer} within start_timeout_s = "
                                                    f"{cfg.start_timeout_s:g} s of accept (keepalives do not count)")
        # Start is bound to the chain verified from Hello: RECEIVE_START only sanity-checks the PDH it is
        # given, so without this a host could show a trusted platform's public chain and its own PDH.
        if bytes(start.pdh) != bytes(hello.platform["pdh"]):
            raise MigrationError(AbortCode.UNTRUSTED_PLATFORM,
                                 "the PDH in start is not the PDH of the chain verified from hello")
        # Freshness: a session is accepted at most once, plaintext or TLS (daemon/replay.py).
        await self.manager.claim_session(start.session)
        # As QEMU on KVM: the VM (KVM_SEV_INIT with an ASID of the guest's kind, its memory slot) first,
        # then RECEIVE_START through it; KVM binds the ASID (ACTIVATE) to the new context.
        self.asid = self.daemon.allocate_asid(es=bool(start.policy & Policy.ES))
        self.vm = await self.manager.new_incoming_vm(name=self.name, memory_bytes=hello.memory_bytes,
                                               policy=start.policy, handle=None, asid=self.asid,
                                               vcpus=hello.vcpus)
        self.sev = self.vm.host.sev
        self.ram = RamReceiver(self.vm.host)
        self.handle = await self.daemon.psp.run(
            "RECEIVE_START", lambda: self.sev.receive_start(policy=start.policy, pdh_cert=start.pdh,
                                                            session=start.session))
        self.vm.received(self.handle)
        self.record = await self.manager.settle.incoming_started(self, session_id=ch.conn.session_id,
                                                                 source_chip=self.source_chip)
        self.npages = self.vm.npages
        self.hosted = self.manager.add_incoming_guest(self.name, self.vm)
        self.hosted.migration = self.stats
        self.stats.status = "active"
        self.stats.setup_time_ms = round((trio.current_time() - self.stats.started_at) * 1000, 3)
        failure: BaseException | None = None
        async with trio.open_nursery() as nursery:
            if POPULATE_INCOMING:
                nursery.start_soon(self._populate)
            try:
                await self._receive_loop(ch)
            except (MigrationError, ProtocolError) as exc:
                failure = exc  # raised below, unwrapped (a nursery would wrap it in an ExceptionGroup)
            finally:
                self._populate_stop = True  # the thread stops within one chunk; the nursery waits for it
                nursery.cancel_scope.cancel()  # a populate task waiting for pages stops now
        if failure is not None:
            raise failure

    async def _populate(self) -> None:
        """Prefault the incoming guest's RAM in a worker thread while pages arrive, so first-touch page
        faults are not taken by the loop that applies them (HostView.populate_ram, content-free), never
        more than POPULATE_AHEAD_BYTES beyond the bytes of pages received so far."""
        size = self.vm.memory_bytes
        done = 0
        try:
            while done < size and not self._populate_stop:
                allowed = min(size, self.pages_received * PAGE_SIZE + POPULATE_AHEAD_BYTES)
                if allowed - done < min(POPULATE_STEP_BYTES, size - done):
                    self._pages_arrived = trio.Event()
                    await self._pages_arrived.wait()
                    continue
                await trio.to_thread.run_sync(self.vm.host.populate_ram, lambda: self._populate_stop, done, allowed)
                done = allowed
        except Exception:  # noqa: BLE001 - an optimisation: its failure changes nothing else
            self.log.debug("populate_failed", exc_info=True)

    # -- pages ------------------------------------------------------------------------------------------------

    async def _receive_loop(self, ch: Channel) -> None:
        stall = self.daemon.config.stall_timeout_s
        while True:
            msg = None
            with trio.move_on_after(stall):
                msg = await ch.receive()
            if msg is None:
                raise MigrationError(AbortCode.TIMEOUT, f"nothing but keepalives from {self.peer} for "
                                                        f"stall_timeout_s = {stall:g} s")
            if isinstance(msg, m.Pages):
                await self._apply_pages(msg)
            elif isinstance(msg, m.RoundEnd):
                # (page counts per round and in Complete are checked by the Connection)
                self.stats.enter_round(msg.round)
                self.stats.remaining = msg.remaining * PAGE_SIZE
                self.log.info("round_received", round=self.stats.round, pages=msg.pages,
                              remaining_pages=msg.remaining, transferred=ch.bytes_received)
                await self._push_progress(force=True)
            elif isinstance(msg, m.Bitmap):
                # (its length is checked by the Connection) KVM's bitmap and the VMM's, either dialect
                self.ram.set_bitmap(unpack_bitmap(msg.bits, msg.npages))
                self.stats.status = "device"
            elif isinstance(msg, m.VcpuState):
                await self._apply_vcpu_state(msg)
            elif isinstance(msg, m.Complete):
                await self.daemon.psp.run("RECEIVE_FINISH", self.sev.receive_finish)
                # "ready" is durable before Ready is sent (daemon/settle.py): a settlement query fences it.
                if not await self.manager.settle.incoming_ready(self.record):
                    raise MigrationError(AbortCode.CANCELLED, "fenced by the source's settlement query")
                self.ready = True
                await ch.send(m.Ready())
                self.log.info("incoming_ready", pages=self.pages_received)
            elif isinstance(msg, m.Go):   # (only after our Ready: the Connection's transition table)
                await self._start(ch)
                return
            else:
                raise MigrationError(AbortCode.PROTOCOL_ERROR, f"unexpected {type(msg).__name__} from {self.peer}")

    async def _apply_pages(self, msg: m.Pages) -> None:
        """Private pages through RECEIVE_UPDATE_DATA, shared ones stored raw (their range was checked once,
        by the Connection; the bitmap comes whole with the final Bitmap)."""
        enc, shr = as_pfns(msg.enc_pfns), as_pfns(msg.shr_pfns)
        self.stats.enter_round(msg.round)
        if len(enc):
            def where(exc: KvmError) -> str:
                idx = exc.index
                return f"round {self.stats.round}" + (f", page 0x{int(enc[idx]):x}" if idx is not None and idx < len(enc) else "")

            receive = self._receive_pages
            await self.daemon.psp.run("RECEIVE_UPDATE_DATA", lambda: receive(enc, msg.enc_headers, msg.enc_data),
                                      where=where)
        self.ram.store_shared(shr, msg.shr_data)
        self.pages_received += len(enc) + len(shr)
        self._pages_arrived.set()
        self.stats.private_pages += len(enc)
        self.stats.shared_pages += len(shr)
        await self._push_progress()

    def _receive_pages(self, enc, headers, data) -> None:
        """The batch extension, or one KVM_SEV_RECEIVE_UPDATE_DATA per page (config sev_batch_pages)."""
        if self.daemon.config.sev_batch_pages:
            self.sev.receive_update_data_batch(enc, headers, data)
        else:
            self.sev.receive_update_data_pages(enc, headers, data, SEV_HDR_SIZE)

    async def _apply_vcpu_state(self, msg: m.VcpuState) -> None:
        # Registers for a SEV guest, VMSAs for an SEV-ES one, one per vCPU: the Connection checked that against
        # Hello's `es`, and _refusal Hello's `es` against the policy's ES bit.
        if msg.regs is not None:
            self.vm.host.set_vcpu_state([dict(r) for r in msg.regs])
            return
        n = len(msg.vmsa_header) // SEV_HDR_SIZE
        for i in range(n):
            hdr = msg.vmsa_header[i * SEV_HDR_SIZE:(i + 1) * SEV_HDR_SIZE]
            trans = msg.vmsa[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
            await self.daemon.psp.run("RECEIVE_UPDATE_VMSA",
                                      lambda: self.sev.receive_update_vmsa(hdr, trans, i), where=f"vCPU {i}")

    # -- hand-off ---------------------------------------------------------------------------------------------

    async def _start(self, ch: Channel) -> None:
        """Go arrived: the source has given up its copy. Start ours, then say so.

        If the conversation already broke (e.g. a replayed frame right behind Go) or the guest cannot
        start, we raise before starting: the Abort we then send in state GO is our promise that we did not
        start it, which hands the guest back to the source (PROTOCOL.md §7.3). Once started, we never send
        Abort again (it would break that promise): the worst case is an uncertain hand-off."""
        if ch.failure is not None:
            raise ch.failure

        def start() -> None:
            try:
                self.vm.start_incoming()
            except Exception as exc:  # noqa: BLE001 - any start failure hands the guest back
                raise MigrationError(AbortCode.INTERNAL_ERROR,
                                     f"the guest did not start on the destination: {type(exc).__name__}: {exc}") from None
            # no checkpoint between the start and these lines
            self.started = True
            ch.forbid_abort()
            self.stats.status = "device"  # running here; "completed" once "started" is on its way
            self.manager.start_guest(self.hosted)

        # "committed" durably, then start, under the record's lock: a settlement query answers either
        # before (and fences: we raise, an Abort in GO) or after (started). Once committed we start even
        # if the channel failed meanwhile: a query will say "started".
        await self.manager.settle.incoming_commit(self.record, start)
        now = trio.current_time()
        self.stats.transferred = ch.bytes_received
        self.stats.tick(now)
        await ch.send(m.Started())
        self.stats.status = "completed"
        self.log.info("incoming_completed", total_time_ms=self.stats.total_time_ms,
                      rounds=self.stats.round, transferred=self.stats.transferred,
                      private_pages=self.stats.private_pages, shared_pages=self.stats.shared_pages)
        await self._push_progress(force=True)

    # -- failure -------------------------------------------------------------------------------------------------

    async def _failed(self, err: MigrationError) -> None:
        """Once per migration (the channel calls it before lingering on the close; run() again after)."""
        if self._failure_handled:
            return
        self._failure_handled = True
        with trio.CancelScope(shield=True):
            if self.pending_error is not None and not self.started:
                err = self.pending_error
            self.stats.tick(trio.current_time())
            if self.started:
                # Go arrived and the guest runs here: that is certain from this side (the source gave up
                # the right to resume on its own when it sent go). Only the source can be uncertain, if
                # "started" did not reach it; its operator settles that there with one `resolve`.
                if self.stats.status != "completed":
                    self.stats.status = "completed"
                    self.log.warning("incoming_start_unconfirmed", error=str(err), code=err.code.name,
                                     hint="the source may report the hand-off as uncertain; the guest runs here")
                else:
                    self.log.info("incoming_closed_after_start", detail=str(err))
                return
            self.stats.status = "cancelled" if err.code in (AbortCode.CANCELLED, AbortCode.SHUTDOWN) else "failed"
            self.stats.fail(err.code.name, str(err))
            await self.manager.settle.incoming_aborted(self.record)   # durably, before the copy goes
            self._discard()
            if self.refused:
                pass  # logged as incoming_refused; nothing was reserved
            elif self.name is not None:
                self.log.warning("incoming_failed", error=str(err),
                                 code=err.code.name, rounds=self.stats.round)
            else:
                self.log.info("incoming_closed_before_hello", error=str(err))

    def _discard(self) -> None:
        """DECOMMISSION and drop the partial guest (never started)."""
        if self.hosted is not None:
            try:
                self.manager.drop_guest(self.name, self.hosted)
            except Exception:  # noqa: BLE001 - the DECOMMISSION below must still happen
                self.log.exception("drop_guest_failed")
        if self.vm is not None:
            try:
                self.vm.release()
            except Exception:  # noqa: BLE001
                self.log.exception("release_failed")
        if self.hosted is None and self.asid is not None:
            self.daemon.release_asid(self.asid)

    async def _push_progress(self, *, force: bool = False) -> None:
        now = trio.current_time()
        if not force and now - self._last_progress < PROGRESS_INTERVAL_S:
            return
        self._last_progress = now
        if self.channel is not None:
            self.stats.transferred = self.channel.bytes_received
        self.stats.tick(now)
