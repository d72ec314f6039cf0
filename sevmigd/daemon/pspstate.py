"""The PSP's persistent state in the runtime directory: what makes the emulated PSP survive a daemon restart.

Why: on a real host the PSP keeps its guest contexts (handles, states, VEKs, the TEK/TIK of a migration in
flight) in its own memory; restarting libvirtd or QEMU does not touch them, a reboot clears them (issue
17). Our PSP lives in the daemon process, so the daemon writes them to RUNTIME/psp/ (one runtime directory
per boot: a new one = every context forgotten) and reads them back at start, before guests are re-adopted.

Layout (directory 0700, files 0600, written atomically: temporary file, fsync, rename, directory fsync):

    RUNTIME/psp/sealing.key        the PSP's 32-byte sealing key, made at the first start of this runtime
                                   directory; read by the VMM processes to open their key slots
    RUNTIME/psp/guest-<handle>.ctx one sealed guest context (Firmware.export_guest) per live handle
    RUNTIME/psp/asids.state        msgpack {version, in_use, awaiting_flush} of the host's ASID space (KVM's
                                   bookkeeping) plus the PSP's own sealed ASID flush state (DEACTIVATEd
                                   ASIDs awaiting DF_FLUSH, a WBINVD due)

When: `PspStore.save()` runs after every firmware command that changed a context or the ASID state (the
PspRunner calls it under its lock, before the command's result is returned, so a result is acted on only
once it is durable), and a context is deleted when its handle is gone (DECOMMISSION, SHUTDOWN). The
per-page commands (SEND/RECEIVE_UPDATE_DATA) change no context and cost one flag test. Firmware calls made
outside the runner are picked up by the next save (or `PspStore.watch`, a few times a second).

Restore (`restore(fw, asids)`, blocking): the flush state first, then every context; a damaged or foreign
file is reported (logged with its path, in `RestoreReport.damaged`) and kept beside as
`<name>.damaged-<unix time>`, never fatal to the other guests. ASIDs: those bound to restored contexts are in use; everything the old daemon had in use or
awaiting a flush and that no context holds now awaits a flush (flush-before-reuse is kept, even when
asids.state itself is lost: then every ASID not in use awaits one).

Trust and secrecy: contexts are sealed (AES-GCM, sevmigd.psp.seal) so neither the keys nor anything else
is readable from the files, and a damaged or swapped file is refused by the PSP. Within one runtime
directory an older file could be put back (a rollback): root on the host could do that, as it could stop
the daemon; the emulation does not model a PSP-internal monotonic counter. Nothing here logs a key or a
context's content.

Must never: block the event loop (file I/O runs in worker threads), let a write failure lose the next save
(a failed handle is retried), or follow a symlink out of RUNTIME/psp.
"""

from __future__ import annotations

import os
import re
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import structlog
import trio

from sevmigd.kvm.asid import AsidSpace
from sevmigd.psp import seal
from sevmigd.psp.firmware import MAX_ASID, Firmware
from sevmigd.psp.status import SevError
from sevmigd.store import StoreError, read_file, write_atomic

PSP_DIR = "psp"
KEY_FILE = "sealing.key"
ASID_FILE = "asids.state"
DIR_MODE = 0o700
FILE_MODE = 0o600
ASID_RECORD_VERSION = 1
#: The store's poll interval for firmware changes made outside the runner (`watch`).
WATCH_INTERVAL_S = 0.25
_CONTEXT_RE = re.compile(r"^guest-(\d{4})\.ctx$")

_log = structlog.get_logger("sevmigd.pspstate")


class PspStateError(StoreError):
    """The PSP's state directory or a file in it cannot be used; `path` names it."""


def psp_dir(runtime_dir: os.PathLike | str) -> Path:
    return Path(runtime_dir) / PSP_DIR


def context_file(handle: int) -> str:
    return f"guest-{handle:04d}.ctx"


def _ensure_dir(path: Path) -> None:
    """`path` (RUNTIME/psp) as an owner-only directory, created with any missing parent (0700 too); no
    symlink in its place."""
    missing = [path]
    while not os.path.lexists(missing[-1].parent) and missing[-1].parent != missing[-1]:
        missing.append(missing[-1].parent)     # parents we create are owner-only as well
    for d in reversed(missing):
        try:
            os.mkdir(d, DIR_MODE)
        except FileExistsError:
            pass
        except OSError as exc:
            raise PspStateError(d, f"cannot create: {exc.strerror}") from None
    try:
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):
            raise PspStateError(path, "is not a directory")
        if stat.S_IMODE(st.st_mode) != DIR_MODE:
            os.chmod(path, DIR_MODE)
    except OSError as exc:
        raise PspStateError(path, f"cannot use: {exc.strerror}") from None


def read_sealing_key(runtime_dir: os.PathLike | str) -> bytes:
    """The PSP sealing key of this runtime directory (what a VMM needs to open its key slot). Blocking.
    StoreError when it is missing, not a regular owner-only (0600) file, or not 32 bytes."""
    path = psp_dir(runtime_dir) / KEY_FILE
    key = read_file(path, secret=True)
    if len(key) != seal.SEALING_KEY_SIZE:
        raise PspStateError(path, f"a sealing key is {seal.SEALING_KEY_SIZE} bytes, this file has {len(key)}")
    return key


def load_or_create_sealing_key(runtime_dir: os.PathLike | str, rng=os.urandom) -> bytes:
    """The sealing key, made (from `rng`) at the first start of this runtime directory. Blocking.

    A key file that cannot be used (wrong size or type, readable by others) is set aside as
    `sealing.key.damaged-<unix time>` and a new key made, loudly: the contexts sealed under the old key
    then fail to restore as "foreign" and are reported one by one, and the daemon serves on (the replay
    record's precedent: a damaged file never keeps the host from running guests)."""
    d = psp_dir(runtime_dir)
    _ensure_dir(d)
    path = d / KEY_FILE
    if os.path.lexists(path):
        try:
            return read_sealing_key(runtime_dir)
        except StoreError as exc:
            kept = _set_aside(path)
            _log.error("psp_sealing_key_damaged", path=str(path), error=exc.message, kept=str(kept),
                       action="a new sealing key: contexts sealed under the old one will not restore")
    try:
        write_atomic(path, bytes(rng(seal.SEALING_KEY_SIZE)), FILE_MODE)
    except StoreError as exc:
        raise PspStateError(path, exc.message) from None
    _log.info("psp_sealing_key_created", path=str(path))
    return read_sealing_key(runtime_dir)


def _set_aside(path: Path) -> Path:
    """Rename `path` to `<name>.damaged-<unix time>` (kept for inspection); PspStateError if impossible."""
    kept = path.with_name(f"{path.name}.damaged-{int(time.time())}")
    try:
        os.replace(path, kept)
    except OSError as exc:
        raise PspStateError(path, f"cannot move the damaged file aside: {exc.strerror}") from None
    return kept


@dataclass
class RestoreReport:
    """What `PspStore.restore` found: restored handles, and the files it could not use (path, reason)."""

    handles: list[int] = field(default_factory=list)
    damaged: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class _Pending:
    """One save's worth of work, taken under the runner lock, written in a worker thread."""

    contexts: dict[int, bytes] = field(default_factory=dict)
    deleted: set[int] = field(default_factory=set)
    asids: bytes | None = None


class PspStore:
    """RUNTIME/psp/ for one daemon's Firmware and AsidSpace (see the module docstring)."""

    def __init__(self, runtime_dir: os.PathLike | str, fw: Firmware, asids: AsidSpace):
        self.dir = psp_dir(runtime_dir)
        self.fw = fw
        self.asids = asids
        self._asid_generation = -1           # never written: the first save writes asids.state
        self._retry: set[int] = set()
        self._retry_asids = False
        self.save_errors = 0

    # -- saving --------------------------------------------------------------------------------------------
    def pending(self) -> bool:
        """Something to save (cheap: called after every firmware command)."""
        return (self.fw.changes_pending or self.asids.generation != self._asid_generation
                or bool(self._retry) or self._retry_asids)

    def snapshot(self) -> _Pending:
        """Take the changes and seal what must be written. Synchronous, no I/O: call it where no firmware
        command runs (under the runner's lock)."""
        handles, flush = self.fw.take_changes()
        handles = set(handles) | self._retry
        self._retry = set()
        p = _Pending()
        for h in handles:
            if self.fw.has_guest(h):
                p.contexts[h] = self.fw.export_guest(h)
            else:
                p.deleted.add(h)
        if flush or self._retry_asids or self.asids.generation != self._asid_generation:
            self._asid_generation = self.asids.generation
            self._retry_asids = False
            p.asids = msgpack.packb({"version": ASID_RECORD_VERSION, "in_use": sorted(self.asids.in_use),
                                     "awaiting_flush": sorted(self.asids.awaiting_flush),
                                     "psp": self.fw.export_flush_state()})
        return p

    def write(self, p: _Pending) -> None:
        """Make `p` durable (blocking). Failures are logged with the file's path and retried at the next
        save; they never raise (the firmware command already happened)."""
        for h, blob in sorted(p.contexts.items()):
            self._put(context_file(h), blob, handle=h)
        for h in sorted(p.deleted):
            path = self.dir / context_file(h)
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                self._failed(path, f"cannot delete: {exc.strerror}", handle=h)
                continue
        if p.deleted:
            try:
                fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                _log.error("psp_state_save_failed", path=str(self.dir), error=f"cannot fsync: {exc.strerror}")
        if p.asids is not None:
            self._put(ASID_FILE, p.asids, handle=None)

    def _put(self, name: str, data: bytes, *, handle: int | None) -> None:
        try:
            write_atomic(self.dir / name, data, FILE_MODE)
        except StoreError as exc:
            self._failed(self.dir / name, exc.message, handle=handle)

    def _failed(self, path: Path, error: str, *, handle: int | None) -> None:
        self.save_errors += 1
        if handle is None:
            self._retry_asids = True
        else:
            self._retry.add(handle)
        _log.error("psp_state_save_failed", path=str(path), error=error,
                   note="retried at the next save; a restart now would restore the previous state")

    async def save(self) -> None:
        """snapshot() here, write() in a worker thread. Call with no firmware command running (the
        PspRunner calls it under its lock); shielded, so a save once taken is always written."""
        if not self.pending():
            return
        p = self.snapshot()
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self.write, p)

    async def watch(self, runner, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Save changes made outside the runner (e.g. a guest released directly) a few times a second."""
        task_status.started()
        while True:
            await trio.sleep(WATCH_INTERVAL_S)
            if self.pending():
                await runner.persist_now()

    # -- restoring -----------------------------------------------------------------------------------------
    def restore(self) -> RestoreReport:
        """Read RUNTIME/psp/ into the (fresh, INIT) Firmware and the AsidSpace. Blocking; never raises for
        one bad file (reported in the result and the log)."""
        report = RestoreReport()
        _ensure_dir(self.dir)
        saved_in_use: set[int] = set()
        saved_awaiting: set[int] | None = None
        path = self.dir / ASID_FILE
        if os.path.lexists(path):
            try:
                rec = msgpack.unpackb(read_file(path, secret=True))
                in_use, awaiting = rec["in_use"], rec["awaiting_flush"]
                if (rec.get("version") != ASID_RECORD_VERSION or not _asid_list(in_use)
                        or not _asid_list(awaiting)):
                    raise ValueError("not an ASID record")
                self.fw.import_flush_state(rec["psp"])
                saved_in_use, saved_awaiting = set(in_use), set(awaiting)
            except (StoreError, SevError, ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
                self._damaged(report, path, exc)
        for name in sorted(os.listdir(self.dir)):
            m = _CONTEXT_RE.match(name)
            if m is None:
                continue
            path = self.dir / name
            try:
                blob = read_file(path, secret=True)
                handle = int(m.group(1))
                if handle != _bound_handle(blob):
                    raise PspStateError(path, "holds another handle's context")
                report.handles.append(self.fw.import_guest(blob))
            except (StoreError, SevError) as exc:
                self._damaged(report, path, exc)
        in_use = {self.fw.guest_status(h).asid for h in report.handles} - {0}
        if saved_awaiting is None and report.handles or saved_awaiting is None and report.damaged:
            # The record of which ASIDs await a flush is lost: assume every free one does.
            saved_awaiting = set(range(1, MAX_ASID + 1))
        awaiting = ((saved_awaiting or set()) | saved_in_use | self.fw.asids_awaiting_flush) - in_use
        self.asids.restore(in_use, awaiting)
        self.fw.take_changes()            # what was just imported is what is on disk
        self._asid_generation = self.asids.generation
        if report.handles or report.damaged:
            _log.info("psp_state_restored", handles=report.handles, damaged=len(report.damaged),
                      asids_in_use=sorted(in_use), asids_awaiting_flush=len(awaiting))
        return report

    @staticmethod
    def _damaged(report: RestoreReport, path: Path, exc: Exception) -> None:
        """Report `path` and keep it for inspection as `<name>.damaged-<unix time>` (so that a new context
        of the same handle does not overwrite it, and the next start does not report it again)."""
        reason = exc.message if isinstance(exc, (StoreError, SevError)) else f"{type(exc).__name__}: {exc}"
        report.damaged.append((str(path), reason))
        try:
            kept = _set_aside(path)
        except PspStateError as exc2:
            kept = path
            _log.warning("psp_state_set_aside_failed", path=str(path), error=exc2.message)
        _log.error("psp_state_damaged", path=str(path), error=reason, kept=str(kept), action="not restored")


def _asid_list(v) -> bool:
    return isinstance(v, list) and all(isinstance(a, int) and not isinstance(a, bool) and 1 <= a <= MAX_ASID
                                       for a in v)


def _bound_handle(blob: bytes) -> int:
    """The handle a context blob is bound to (its clear binding; the PSP authenticates it on import)."""
    binding = seal.peek(blob, seal.Kind.GUEST_CONTEXT)
    return int.from_bytes(binding, "little") if len(binding) == 2 else -1


__all__ = ["PspStore", "PspStateError", "RestoreReport", "read_sealing_key", "load_or_create_sealing_key",
           "psp_dir", "context_file", "PSP_DIR", "KEY_FILE", "ASID_FILE"]
