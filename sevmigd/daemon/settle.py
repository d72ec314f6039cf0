"""Settling hand-offs: durable in-flight migration records and the settlement query (issue 17).

A source that sent Go and never heard Started cannot know alone whether the guest runs on the destination
(PROTOCOL.md §7.3 rule 5). Issue 11 left that to an operator (`ctl resolve`). This module settles it
automatically: the source asks the destination, on a NEW connection authenticated exactly like a
migration, "did session S start?" (the Query/Answer conversation, PROTOCOL.md §7.6), and releases or
resumes its copy on the answer.

What makes the answer safe is the destination's **durable record** of each incoming session and its
**fence**:

* destination phases: `receiving` (RECEIVE_START done) -> `ready` (recorded *before* Ready is sent) ->
  `committed` (recorded *before* the guest starts, on Go) | `aborted`. Committing and answering take the
  record's lock, so they are ordered: the answer "started" is given only for a committed record, and
  "not_started" only after the record moved to `aborted` durably -- after which a Go still in flight on
  the old connection is refused (Abort in state GO: the destination's promise, rule 6) and the guest is
  never started. An answer is therefore a promise the destination keeps across its own restart.
* source phases: `started` (the destination's platform verified, before SEND_START) -> `go_sent` (recorded
  *before* Go can reach the wire) -> `settled` with a resolution (`released` | `resumed`) and who settled
  it (`completed`, `rolled_back`, `query`, `operator`, `restart`).

Who may ask: only the platform that sent the session. The destination answers from its record only when
the asker's verified TLS certificate names the chip recorded at Hello; any other asker, and every asker
over a plaintext channel, gets `unknown` with one fixed reason whether or not the session exists -- it can
neither fence a copy nor learn anything. A source trusts an answer only from a TLS peer whose certificate
names the destination chip it recorded; in `insecure_plaintext` mode it never asks (issue 11's rule: the
hand-off ends uncertain for the operator).

Records live in `RUNTIME/migrations/` (mode 0700), one JSON file per migration and role, mode 0600,
written atomically (temporary file, fsync, rename, directory fsync) in a worker thread. The runtime
directory is per boot (DESIGN17.md): a host reboot forgets them, as it forgets the guests.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time
from typing import TYPE_CHECKING

import trio

from sevmigd import store
from sevmigd.daemon.channel import run_channel
from sevmigd.migrate.errors import MigrationError
from sevmigd.wire import Connection, Role
from sevmigd.wire import messages as m
from sevmigd.wire.errors import AbortCode

if TYPE_CHECKING:
    from sevmigd.daemon.source import OutgoingMigration

DIR_NAME = "migrations"
# Records of finished migrations kept per role (the newest), so a source that comes back after a long
# partition or a restart still gets a "started" / "not_started" rather than "unknown".
KEEP_FINISHED = 256
# A record file is a few hundred bytes; anything larger is not ours.
MAX_RECORD_BYTES = 16 << 10

SOURCE_PHASES = ("started", "go_sent", "settled")
DESTINATION_PHASES = ("receiving", "ready", "committed", "aborted")
# The one reason given to an asker who gets no information: the same text whether or not the session exists.
UNKNOWN_REASON = "no session of that id from your platform is known here"
PLAINTEXT_REASON = "a settlement answer needs an authenticated channel (mutual TLS)"


# Fields a record written by an older daemon may lack (their defaults apply).
OPTIONAL_FIELDS = ("vmm",)


class RecordError(Exception):
    """A record file that cannot be read or written (typed: its path and why)."""


@dataclasses.dataclass
class Record:
    """One migration's in-flight record (see the module docstring for the phases)."""

    role: str                 # "source" | "destination"
    migration_id: str
    session_id: str
    guest: str
    peer: str                 # the other daemon, "host:port" (source: where the destination listens)
    peer_chip: str            # the chip id of the other platform, verified through TLS and its chain
    phase: str
    resolution: str | None = None   # source, settled: "released" | "resumed" | "lost"
    settled_by: str | None = None   # source, settled: completed | rolled_back | query | operator | restart
    updated_at: float = 0.0
    # destination: the id of the VMM process holding this session's copy (None: an inline guest). A restarted
    # daemon acts on an adopted copy only when its VMM is this one: guest names repeat across migrations (a
    # guest comes back), so the name alone would let an old session's record start a newer session's copy.
    vmm: str | None = None

    @property
    def file_name(self) -> str:
        return f"{self.role}-{self.migration_id}-{self.session_id}.json"

    @property
    def finished(self) -> bool:
        return self.phase in ("settled", "committed", "aborted")

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Record:
        d = json.loads(data)
        if not isinstance(d, dict):
            raise ValueError("not an object")
        names = {f.name for f in dataclasses.fields(cls)}
        if set(d) | set(OPTIONAL_FIELDS) != names:   # (records of an older daemon lack the optional ones)
            raise ValueError(f"fields {sorted(d)} are not {sorted(names)}")
        rec = cls(**d)
        phases = SOURCE_PHASES if rec.role == "source" else DESTINATION_PHASES if rec.role == "destination" else ()
        if rec.phase not in phases:
            raise ValueError(f"phase {rec.phase!r} of role {rec.role!r}")
        for name in ("migration_id", "session_id", "guest", "peer", "peer_chip"):
            if not isinstance(getattr(rec, name), str):
                raise ValueError(f"{name} is not a string")
        return rec


class RecordStore:
    """The records on disk. Blocking: every method runs in a worker thread (trio.to_thread)."""

    def __init__(self, runtime_dir: str):
        self.dir = pathlib.Path(runtime_dir) / DIR_NAME if runtime_dir else None

    def save(self, rec: Record) -> None:
        if self.dir is None:
            return  # no runtime directory (in-process daemons of unit tests): in memory only
        try:
            store._ensure_dir(self.dir)
            store.write_atomic(self.dir / rec.file_name, rec.to_json())
        except store.StoreError as exc:
            raise RecordError(f"migration record {rec.file_name}: {exc}") from None

    def load(self) -> tuple[list[Record], list[str]]:
        """Every record in the directory, and one line per file that is not a valid record (left alone)."""
        if self.dir is None or not self.dir.is_dir():
            return [], []
        recs, bad = [], []
        for path in sorted(self.dir.glob("*.json")):
            try:
                data = store.read_file(path, secret=True)
                if len(data) > MAX_RECORD_BYTES:
                    raise ValueError("too large")
                rec = Record.from_json(data)
                if rec.file_name != path.name:
                    raise ValueError("its name does not match its content")
                recs.append(rec)
            except (store.StoreError, ValueError, TypeError) as exc:
                bad.append(f"{path.name}: {exc}")
        return recs, bad

    def prune(self, recs: list[Record]) -> None:
        """Delete the oldest finished records beyond KEEP_FINISHED per role."""
        if self.dir is None:
            return
        for role in ("source", "destination"):
            done = sorted((r for r in recs if r.role == role and r.finished), key=lambda r: r.updated_at)
            for r in done[:-KEEP_FINISHED]:
                try:
                    os.unlink(self.dir / r.file_name)
                except OSError:
                    pass


class IncomingRecord:
    """A destination record with its lock (commit and fence are ordered by it) and its migration."""

    def __init__(self, rec: Record, mig=None):
        self.rec = rec
        self.lock = trio.Lock()
        self.mig = mig          # the IncomingMigration while its connection runs (None after a restart)
        # A committed record of a previous daemon process whose guest was not re-adopted: it started here
        # and died with that process. Its answer is "unknown" (see Settlement.answer), never "started".
        self.lost = False


class Settlement:
    """The daemon's settlement service: records of both roles, the query's server and client sides."""

    def __init__(self, manager):
        self.manager = manager
        self.daemon = manager.daemon
        self.store = RecordStore(getattr(self.daemon.config, "runtime_dir", ""))
        self.incoming: dict[str, IncomingRecord] = {}     # by session id
        self.outgoing: dict[str, Record] = {}             # by migration id
        self.loaded = False
        self.counts = {"query": 0, "operator": 0, "restart": 0}

    @property
    def log(self):
        return self.daemon.log

    def _cfg(self, name: str, default: float) -> float:
        return getattr(self.daemon.config, name, default)

    async def persist_psp(self) -> None:
        """Save PSP contexts changed by firmware commands run outside `psp.run` (SEND_CANCEL / SEND_FINISH
        of a settlement) before a record says the migration is settled (daemon/pspstate.py)."""
        persist = getattr(getattr(self.daemon, "psp", None), "persist_now", None)
        if persist is None:
            return
        try:
            with trio.CancelScope(shield=True):
                await persist()
        except Exception as exc:  # noqa: BLE001 - the store reports its own errors; the record still goes
            self.log.error("psp_persist_failed", error=str(exc))

    async def _save(self, rec: Record) -> None:
        rec.updated_at = time.time()
        if self.store.dir is not None:   # (no runtime directory: in memory only, no thread hop)
            await trio.to_thread.run_sync(self.store.save, rec)

    # -- destination ------------------------------------------------------------------------------------------

    async def incoming_started(self, mig, *, session_id: str, source_chip: str) -> IncomingRecord:
        """After RECEIVE_START: the session exists here (phase receiving)."""
        vmm = getattr(getattr(mig.vm, "vmm", None), "vid", None)
        rec = Record("destination", mig.id, session_id, mig.name, mig.peer, source_chip, "receiving", vmm=vmm)
        entry = IncomingRecord(rec, mig)
        self.incoming[session_id] = entry
        try:
            await self._save(rec)
        except RecordError as exc:
            raise MigrationError(AbortCode.INTERNAL_ERROR, f"cannot record the session: {exc}") from None
        return entry

    async def incoming_ready(self, entry: IncomingRecord) -> bool:
        """Before Ready is sent: ready, durably. False when a query fenced the session meanwhile."""
        async with entry.lock:
            if entry.rec.phase != "receiving":
                return False
            entry.rec.phase = "ready"
            try:
                await self._save(entry.rec)
            except RecordError as exc:
                entry.rec.phase = "aborted"
                raise MigrationError(AbortCode.INTERNAL_ERROR, f"cannot record ready: {exc}") from None
            return True

    async def incoming_commit(self, entry: IncomingRecord, start) -> None:
        """On Go: committed (durably) and then `start()` the guest, under the record's lock, so no query
        answers between the two. A fenced record raises (Abort in GO: we will not start). A commit that
        cannot be written, or a start that fails, leaves the record aborted and raises."""
        async with entry.lock:
            if entry.rec.phase != "ready":
                raise MigrationError(AbortCode.CANCELLED, "the source's settlement query fenced this session: "
                                                          "the guest will not start here")
            entry.rec.phase = "committed"
            try:
                await self._save(entry.rec)
                start()
            except BaseException as exc:
                entry.rec.phase = "aborted"
                with trio.CancelScope(shield=True):
                    await self._save_quietly(entry.rec)
                if isinstance(exc, RecordError):
                    raise MigrationError(AbortCode.INTERNAL_ERROR, f"cannot record the commit: {exc}") from None
                raise

    async def incoming_aborted(self, entry: IncomingRecord | None) -> None:
        """The incoming copy is being discarded (any failure before Go)."""
        if entry is None:
            return
        async with entry.lock:
            if entry.rec.phase in ("receiving", "ready"):
                entry.rec.phase = "aborted"
                await self._save_quietly(entry.rec)
            entry.mig = None

    async def _save_quietly(self, rec: Record) -> None:
        try:
            await self._save(rec)
        except RecordError as exc:
            self.log.error("migration_record_write_failed", error=str(exc))

    async def answer(self, query: m.Query, peer_platforms: frozenset[str] | None, peer: str) -> m.Answer:
        """The destination's answer to a settlement query (see the module docstring for who may ask)."""
        def reply(outcome: str, reason: str) -> m.Answer:
            self.log.info("settle_query_answered", peer=peer, migration_id=query.migration_id[:64],
                          session_id=query.session_id, outcome=outcome)
            return m.Answer(session_id=query.session_id, outcome=outcome, reason=reason)

        if peer_platforms is None:
            return reply(m.OUTCOME_UNKNOWN, PLAINTEXT_REASON)
        entry = self.incoming.get(query.session_id)
        if entry is None or entry.rec.peer_chip not in peer_platforms:
            if entry is not None:
                self.log.warning("settle_query_from_another_platform", peer=peer, session_id=query.session_id,
                                 named=sorted(c[:16] for c in peer_platforms))
            return reply(m.OUTCOME_UNKNOWN, UNKNOWN_REASON)
        async with entry.lock:
            rec = entry.rec
            if rec.phase == "committed" and entry.lost:
                # True, but "started" would make the source drop the last copy of a guest that died here
                # with a daemon process (no VMM kept it): whether to run its older copy is the operator's call.
                return reply(m.OUTCOME_UNKNOWN, "the guest was started here but did not survive a restart of "
                                                "this daemon; decide with `ctl resolve`")
            if rec.phase == "committed":
                return reply(m.OUTCOME_STARTED, "the guest was started here on go")
            if rec.phase in ("receiving", "ready"):
                # The fence: from here on this session never starts the guest (a Go still in flight is
                # refused), durably, before we say so.
                rec.phase = "aborted"
                try:
                    await self._save(rec)
                except RecordError as exc:
                    self.log.error("settle_fence_write_failed", error=str(exc))
                    return reply(m.OUTCOME_UNKNOWN, "the fence could not be recorded; ask again")
                self.log.warning("settle_fenced", guest=rec.guest, migration_id=rec.migration_id,
                                 session_id=rec.session_id)
                mig = entry.mig
                if mig is not None:
                    mig.cancel(MigrationError(AbortCode.CANCELLED, "fenced by the source's settlement query"))
            return reply(m.OUTCOME_NOT_STARTED, "the guest was not and will not be started here")

    async def serve_query(self, ch, query: m.Query, peer_platforms, peer: str) -> None:
        """The destination's side of a settlement connection (IncomingMigration hands it the Query)."""
        await ch.send(await self.answer(query, peer_platforms, peer))

    # -- source -----------------------------------------------------------------------------------------------

    async def outgoing_started(self, mig: OutgoingMigration, dest_chip: str) -> None:
        """The destination's platform is verified, before SEND_START."""
        rec = Record("source", mig.id, mig.stats.session_id or "", mig.hosted.name, mig.stats.peer, dest_chip,
                     "started")
        self.outgoing[mig.id] = rec
        try:
            await self._save(rec)
        except RecordError as exc:
            raise MigrationError(AbortCode.INTERNAL_ERROR, f"cannot record the migration: {exc}") from None

    async def outgoing_go(self, mig: OutgoingMigration) -> None:
        """Before Go can reach the wire: go_sent, durably (PROTOCOL.md §7.3 rule 2)."""
        rec = self.outgoing.get(mig.id)
        if rec is None:
            return
        rec.phase = "go_sent"
        try:
            await self._save(rec)
        except RecordError as exc:
            raise MigrationError(AbortCode.INTERNAL_ERROR, f"cannot record go: {exc}") from None

    async def outgoing_settled(self, mig: OutgoingMigration, resolution: str, by: str) -> None:
        rec = self.outgoing.get(mig.id)
        if rec is None:
            return
        rec.phase, rec.resolution, rec.settled_by = "settled", resolution, by
        with trio.CancelScope(shield=True):
            if by in ("query", "operator"):
                await self.persist_psp()   # the SEND_CANCEL / SEND_FINISH of the settlement first
            await self._save_quietly(rec)

    def outgoing_settled_soon(self, mig: OutgoingMigration, resolution: str, by: str) -> None:
        """`outgoing_settled` from synchronous code (the operator's resolve)."""
        nursery = self.daemon.nursery
        if nursery is not None and mig.id in self.outgoing:
            nursery.start_soon(self.outgoing_settled, mig, resolution, by)

    # -- restart ----------------------------------------------------------------------------------------------

    async def restore(self) -> None:
        """At start, before the listener: read the records a previous daemon process left.

        Destination: `committed` and `aborted` records answer queries as they are; `receiving` and `ready`
        records are fenced by `resume()`. Source: records before go and after go are settled by `resume()`."""
        if self.store.dir is None:
            self.loaded = True
            return
        recs, bad = await trio.to_thread.run_sync(self.store.load)
        for line in bad:
            self.log.error("migration_record_unreadable", record=line)
        for rec in recs:
            if rec.role == "destination":
                self.incoming[rec.session_id] = IncomingRecord(rec)
            else:
                self.outgoing[rec.migration_id] = rec
        await trio.to_thread.run_sync(self.store.prune, recs)
        self.loaded = True
        if recs:
            self.log.info("migration_records_restored", records=len(recs),
                          unfinished=sum(1 for r in recs if not r.finished))

    def _copy_of(self, rec: Record):
        """The re-adopted guest that holds `rec`'s incoming copy: the one whose VMM the record names. None
        when no such guest is here (a guest of the same name held by another VMM is another session's)."""
        hosted = self.daemon.guests.get(rec.guest)
        vmm = getattr(getattr(hosted, "vm", None), "vmm", None)
        if hosted is None or rec.vmm is None or vmm is None or vmm.vid != rec.vmm:
            return None
        return hosted

    async def resume(self) -> None:
        """After `restore()` and the re-adoption of guests that outlived the previous daemon process (VMM
        processes, daemon/vmmhost.py), BEFORE the migration listener and the control socket serve (so no
        query is answered and no `list` is shown from a half-settled state): settle what that process left.

        Destination, per record of the previous process:
        * `committed`: the promise "started" is on disk; its copy (found by its VMM, never by the guest's
          name alone) is started if the process died between the commit and the start. A committed session
          whose copy is not here answers `unknown` from now on (`IncomingRecord.lost`).
        * `receiving` / `ready`: fenced (aborted, durably) and its copy discarded. Its Go could only have come
          on the connection that died with the previous process, and the protocol has no other way to start
          it, so keeping it could only leak it; the fence makes the answer to the source's query
          `not_started`, on which the source resumes its own copy. The destination thus never starts (nor
          leaves) a copy that the source may still run.
        * an adopted incoming copy that no record claims (the process died between RECEIVE_START and the
          first record) can never start either: discarded."""
        started = set()
        for entry in list(self.incoming.values()):
            rec = entry.rec
            if entry.mig is not None:
                continue   # a migration of this process (none before the listener serves)
            hosted = self._copy_of(rec)
            if rec.phase == "committed":
                if hosted is not None and hosted.state == "incoming":
                    # Committed (the promise "started" was on disk) but the process died before the start:
                    # keep the promise now.
                    try:
                        hosted.vm.start_incoming()
                        self.daemon.start_guest(hosted)
                        self.log.warning("incoming_started_after_restart", guest=rec.guest,
                                         migration_id=rec.migration_id, session_id=rec.session_id)
                    except Exception as exc:  # noqa: BLE001 - reported as lost below
                        self.log.error("incoming_start_after_restart_failed", guest=rec.guest, error=str(exc))
                if rec.vmm is None and hosted is None:   # a record of an older daemon: by name, as it did
                    named = self.daemon.guests.get(rec.guest)
                    entry.lost = named is None or named.state not in ("running", "paused")
                else:
                    entry.lost = hosted is None or hosted.state not in ("running", "paused")
                if hosted is not None:
                    started.add(id(hosted))
            if rec.phase in ("receiving", "ready"):
                rec.phase = "aborted"
                await self._save_quietly(rec)
                if hosted is not None and hosted.state == "incoming":
                    self._discard_incoming(rec.guest, hosted)
                self.log.warning("incoming_discarded_after_restart", guest=rec.guest, migration_id=rec.migration_id,
                                 session_id=rec.session_id, note="an unfinished incoming copy never starts")
        for name, hosted in list(self.daemon.guests.items()):
            if hosted.state == "incoming" and id(hosted) not in started:
                self._discard_incoming(name, hosted)
                self.log.warning("incoming_discarded_after_restart", guest=name,
                                 note="an adopted incoming copy that no committed session claims never starts")
        for rec in list(self.outgoing.values()):
            hosted = self.daemon.guests.get(rec.guest)
            if rec.phase == "started":
                # Before go: the guest is the source's (PROTOCOL.md §7.3 rule 1). A guest that survived the
                # daemon (its VMM) resumes here (SEND_CANCEL); without one there is nothing to resume. The
                # destination discards its partial copy (its connection died with us).
                if hosted is not None:
                    self.manager.settle_restored_guest(rec.guest, run_here=True)
                    await self.persist_psp()
                rec.phase, rec.settled_by = "settled", "restart"
                rec.resolution = "resumed" if hosted is not None else "lost"
                await self._save_quietly(rec)
                self.counts["restart"] += 1
                self.log.warning("outgoing_settled_after_restart", guest=rec.guest, migration_id=rec.migration_id,
                                 resolution=rec.resolution, phase="before go")
            elif rec.phase == "go_sent" and self.daemon.nursery is not None:
                if hosted is not None:
                    hosted.state = "migrating"   # paused, uncertain: no migrate, no resume until settled
                self.daemon.nursery.start_soon(self._settle_restored, rec)

    def _discard_incoming(self, name: str, hosted) -> None:
        """An adopted incoming copy that will never start: drop it, quit its VMM, DECOMMISSION."""
        try:
            self.manager.drop_guest(name, hosted)
            hosted.vm.release()
        except Exception as exc:  # noqa: BLE001 - reported; the record already says aborted
            self.log.error("incoming_discard_after_restart_failed", guest=name, error=str(exc))

    async def _settle_restored(self, rec: Record) -> None:
        """A go_sent record of a previous daemon process: ask the destination until it answers."""
        log = self.log.bind(migration_id=rec.migration_id, guest=rec.guest, session_id=rec.session_id,
                            role="source")
        delay = self._cfg("settle_retry_initial_s", 0.5)
        attempt = 0
        while not self.daemon.shutting_down:
            attempt += 1
            answer = await self._ask(rec, log, attempt)
            if answer is not None and answer.outcome != m.OUTCOME_UNKNOWN:
                hosted = self.daemon.guests.get(rec.guest)
                started = answer.outcome == m.OUTCOME_STARTED
                # A guest that survived the daemon (its VMM) is released or resumed; without one, the
                # answer says where the guest is: on the destination, or nowhere.
                if hosted is not None:
                    self.manager.settle_restored_guest(rec.guest, run_here=not started)
                    await self.persist_psp()
                    rec.resolution = "resumed" if not started else "released"
                else:
                    rec.resolution = "released" if started else "lost"
                rec.phase, rec.settled_by = "settled", "restart"
                await self._save_quietly(rec)
                self.counts["restart"] += 1
                (log.warning if started else log.error)("outgoing_settled_after_restart", outcome=answer.outcome,
                                                        resolution=rec.resolution, phase="after go")
                return
            if answer is not None:
                log.error("settle_unknown", reason=answer.reason)
                return
            await trio.sleep(delay)   # bounded backoff between attempts
            delay = min(delay * 2, self._cfg("settle_retry_max_s", 30.0))

    # -- the source's settlement loop ---------------------------------------------------------------------

    def start_settling(self, mig: OutgoingMigration) -> bool:
        """An uncertain hand-off over an authenticated channel: keep asking the destination in the
        background until it answers (or an operator resolves). False when we cannot ask."""
        rec = self.outgoing.get(mig.id)
        nursery = self.daemon.nursery
        if rec is None or not rec.session_id or mig.peer_platforms is None or nursery is None:
            return False
        nursery.start_soon(self._settle_loop, mig, rec)
        return True

    async def _settle_loop(self, mig: OutgoingMigration, rec: Record) -> None:
        name = mig.hosted.name
        delay = self._cfg("settle_retry_initial_s", 0.5)
        limit = self._cfg("settle_retry_max_s", 30.0)
        log = mig.log.bind(session_id=rec.session_id)
        while self.manager.uncertain.get(name) is mig and not self.daemon.shutting_down:
            mig.stats.settle_attempts += 1
            answer = await self._ask(rec, log, mig.stats.settle_attempts)
            if self.manager.uncertain.get(name) is not mig:
                return  # an operator resolved it meanwhile
            if answer is not None and answer.outcome == m.OUTCOME_UNKNOWN:
                mig.stats.settlement_note = f"the destination does not know the session: {answer.reason}"
                log.error("settle_unknown", reason=answer.reason,
                          hint=f"`sevmigd ctl resolve {name} --discard|--run-here` after looking at {rec.peer}")
                return
            if answer is not None:
                self.manager.settle_uncertain(name, run_here=answer.outcome == m.OUTCOME_NOT_STARTED, by="query")
                return
            await trio.sleep(delay)   # bounded backoff between attempts, not a synchronisation
            delay = min(delay * 2, limit)

    async def _ask(self, rec: Record, log, attempt: int) -> m.Answer | None:
        """One settlement query; None when the destination could not be asked or its answer is not to be
        trusted (a peer that is not the recorded destination platform)."""
        cfg = self.daemon.config
        host, _, port = rec.peer.rpartition(":")
        host = host.strip("[]")
        raw = None
        try:
            with trio.fail_after(cfg.handshake_timeout_s):
                raw = await trio.open_tcp_stream(host, int(port))
                stream = await self.manager.wrap_client_tls(raw, host)
        except (OSError, trio.TooSlowError, MigrationError, ValueError) as exc:
            if raw is not None:
                await trio.aclose_forcefully(raw)
            log.info("settle_peer_unreachable", peer=rec.peer, error=str(exc) or type(exc).__name__,
                     attempt=attempt)
            return None
        named = self.manager.peer_platforms(stream)
        if named is None or rec.peer_chip not in named:
            await trio.aclose_forcefully(stream)
            log.warning("settle_peer_is_not_the_destination", peer=rec.peer,
                        named=sorted(c[:16] for c in named or ()))
            return None
        conn = Connection(Role.SOURCE, rng=os.urandom, limits=self.manager.wire_limits())

        async def body(ch):
            await ch.send(m.Query(version=self.manager.protocol_version, migration_id=rec.migration_id,
                                  session_id=rec.session_id))
            answer = None
            with trio.move_on_after(cfg.handshake_timeout_s):
                answer = await ch.receive_expect(m.Answer)
            if answer is None:
                raise MigrationError(AbortCode.TIMEOUT, f"no answer within {cfg.handshake_timeout_s:g} s")
            return answer

        try:
            answer = await run_channel(stream, conn, body, peer=rec.peer,
                                       keepalive_interval_s=cfg.keepalive_interval_s,
                                       peer_timeout_s=cfg.peer_timeout_s, log=log)
        except MigrationError as exc:
            log.info("settle_query_failed", peer=rec.peer, error=str(exc) or type(exc).__name__,
                     attempt=attempt)
            return None
        log.info("settle_answer", peer=rec.peer, outcome=answer.outcome, reason=answer.reason)
        return answer
