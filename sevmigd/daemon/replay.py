"""The destination's replay record: every session it accepted, so that none is accepted twice.

Why: the SEV session blob (SEND_START's 128 bytes: nonce, TEK/TIK wrapped under keys from ECDH(source
PDH, destination PDH), policy MAC) is fixed by the firmware API and carries nothing of the connection it
travels on. Whoever recorded one migration (Hello, Start, pages, vCPU state) can open a new connection,
run a new channel handshake (fresh X25519 keys, fresh frame MACs) and send it all again: RECEIVE_START
opens the session just as well the second time, and a second copy of the guest would run (issue 11,
attack 2). The channel binds Start to *this* connection (its MAC keys come from this handshake's
transcript, PROTOCOL.md §9.2), but not to *this migration*: only the destination can say "I have seen this
session before". So it keeps the SHA-256 of every Start.session it gave to RECEIVE_START, durably (fsync'd
before RECEIVE_START runs), across restarts, and refuses a known one with REPLAYED_SESSION (15).

Bounded: the newest `window` digests are kept (default 16384: 512 KiB on disk, a few MiB in memory); older
ones are evicted. A session older than the window is still useless once the destination's PDH has been
rotated (`sevmigd platform pdh-gen`): it was wrapped to the old PDH. Operators who receive more than
`window` guests between PDH rotations should rotate the PDH at least that often.

File format (STATE_DIR/replay.record, mode 0600): the 16-byte magic MAGIC, then 32-byte digests, oldest
first. A torn last entry (crash during an append) is dropped at load: its RECEIVE_START never ran, since
the append is fsync'd first. Anything else (wrong magic, not a regular file) is a `ReplayRecordError`; the
daemon then rotates its PDH (PDH_GEN: every session recorded before becomes unopenable) and starts a fresh
record, keeping the damaged file next to it for inspection (server.py).

Must never: accept a session whose digest could not be made durable, or block the event loop (the
append runs in a worker thread; lookups and the in-memory reservation are synchronous, so two connections
racing with the same session cannot both pass).
"""

from __future__ import annotations

import collections
import hashlib
import os
import stat
import time
from pathlib import Path

from sevmigd.store import StoreError, write_atomic

MAGIC = b"SEVMIGD-REPLAY01"
DIGEST_SIZE = 32
FILE_NAME = "replay.record"
DEFAULT_WINDOW = 16384
FILE_MODE = 0o600


class ReplayRecordError(StoreError):
    """The replay record cannot be read or written; `path` names the file."""


def session_digest(session: bytes) -> bytes:
    return hashlib.sha256(bytes(session)).digest()


class ReplayRecord:
    """The digests of accepted sessions (see the module docstring). `open()` loads or creates the file."""

    def __init__(self, path: os.PathLike | str, window: int = DEFAULT_WINDOW):
        if window < 1:
            raise ValueError("window must be >= 1")
        self.path = Path(path)
        self.window = window
        self._order: collections.deque[bytes] = collections.deque()
        self._known: set[bytes] = set()
        self._entries_on_disk = 0

    @classmethod
    def open(cls, path: os.PathLike | str, window: int = DEFAULT_WINDOW) -> ReplayRecord:
        rec = cls(path, window)
        rec._load()
        return rec

    # -- queries -----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._known)

    def __contains__(self, session: bytes) -> bool:
        return session_digest(session) in self._known

    def reserve(self, session: bytes) -> bytes | None:
        """Claim `session`: its digest when it was never seen (now reserved in memory: a second claim of it
        fails from here on, even before `persist`), None when it is a replay. No I/O."""
        digest = session_digest(session)
        if digest in self._known:
            return None
        self._known.add(digest)
        self._order.append(digest)
        return digest

    # -- durability (blocking: call from a worker thread) ---------------------------------------------
    def persist(self, digest: bytes) -> None:
        """Append `digest` and fsync; compact to the newest `window` entries when the file has grown by a
        quarter beyond it. Raises ReplayRecordError (then the caller must not run RECEIVE_START)."""
        try:
            fd = self._open_append()
            try:
                _write_all(fd, digest)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise ReplayRecordError(self.path, f"cannot append: {exc.strerror}") from None
        self._entries_on_disk += 1
        while len(self._order) > self.window:
            self._known.discard(self._order.popleft())
        if self._entries_on_disk > self.window + self.window // 4:
            self._rewrite()

    def reset(self) -> Path | None:
        """Start an empty record; a damaged file is kept as `<name>.damaged-<unix time>`. Returns its path."""
        kept = None
        if os.path.lexists(self.path):
            kept = self.path.with_name(f"{self.path.name}.damaged-{int(time.time())}")
            try:
                os.replace(self.path, kept)
            except OSError as exc:
                raise ReplayRecordError(self.path, f"cannot move the damaged record aside: {exc.strerror}") from None
        self._order.clear()
        self._known.clear()
        self._create()
        return kept

    # -- internals ---------------------------------------------------------------------------------
    def _load(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_NOFOLLOW)
        except FileNotFoundError:
            self._create()
            return
        except OSError as exc:
            raise ReplayRecordError(self.path, f"cannot open: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ReplayRecordError(self.path, "is not a regular file")
            if stat.S_IMODE(st.st_mode) & 0o077:
                os.fchmod(fd, FILE_MODE)
            data = _read_all(fd)
            if len(data) < len(MAGIC):
                if MAGIC.startswith(data):  # torn creation: nothing was ever recorded
                    os.ftruncate(fd, 0)
                    _write_all(fd, MAGIC)
                    os.fsync(fd)
                    return
                raise ReplayRecordError(self.path, "not a sevmigd replay record (bad header)")
            if data[:len(MAGIC)] != MAGIC:
                raise ReplayRecordError(self.path, "not a sevmigd replay record (bad header)")
            body = data[len(MAGIC):]
            whole = len(body) - len(body) % DIGEST_SIZE
            if whole != len(body):  # torn last append: that session never reached RECEIVE_START
                os.ftruncate(fd, len(MAGIC) + whole)
                os.fsync(fd)
        except OSError as exc:
            raise ReplayRecordError(self.path, f"cannot read: {exc.strerror}") from None
        finally:
            os.close(fd)
        entries = [body[i:i + DIGEST_SIZE] for i in range(0, whole, DIGEST_SIZE)]
        self._entries_on_disk = len(entries)
        for d in entries[-self.window:]:
            if d not in self._known:
                self._known.add(d)
                self._order.append(d)

    def _open_append(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)

    def _create(self) -> None:
        self._write_new([])
        self._entries_on_disk = 0

    def _rewrite(self) -> None:
        self._write_new(list(self._order))
        self._entries_on_disk = len(self._order)

    def _write_new(self, entries: list[bytes]) -> None:
        """The whole file anew, atomically (temporary file, fsync, rename, directory fsync)."""
        try:
            write_atomic(self.path, MAGIC + b"".join(entries), FILE_MODE)
        except StoreError as exc:
            raise ReplayRecordError(self.path, exc.message) from None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


__all__ = ["ReplayRecord", "ReplayRecordError", "session_digest", "FILE_NAME", "DEFAULT_WINDOW", "MAGIC"]
