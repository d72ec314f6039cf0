"""The host's one PSP, as the daemon sees it: every firmware command of every guest goes through here.

Owns `PspRunner(fw)` and its one method, `await runner.run(command, fn)`: run `fn` (a zero-argument
callable that issues firmware command(s) named `command` in the SEV API's spelling, e.g.
"SEND_UPDATE_DATA") the way a host runs its single PSP:

* one at a time (a trio lock; the real PSP processes one command buffer at a time, and the emulated
  firmware's state is not meant for concurrent callers);
* then wait out the firmware's pacing debt (`Firmware.take_pacing_debt()`: the modelled command time of
  a slow PSP; 0 when pacing is off), outside the lock like the hardware's mailbox would be free;
* a firmware failure (SevError, or KvmError from a command issued through sevmigd.kvm) becomes `FirmwareCommandError`, one typed error naming the command and
  the SEV status, which is a MigrationError with AbortCode FIRMWARE_ERROR for the drivers and the
  "FirmwareError" class for control clients;
* observers (`runner.observers.append(fn)`) hear `fn(command, seconds, status)` after every command
  (status None on success), e.g. to count and time commands for metrics;
* with a `store` (sevmigd.daemon.pspstate.PspStore), the contexts a command changed are saved before
  `run` returns or raises, still under the lock (a result is acted on only once it is durable; the
  per-page commands change nothing and cost one `store.pending()` test).

It must never run two firmware commands at once or swallow a firmware error.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import trio

from sevmigd.kvm import KvmError
from sevmigd.migrate.errors import FirmwareCommandError
from sevmigd.psp.firmware import Firmware
from sevmigd.psp.status import SevError, SevStatus

T = TypeVar("T")
PspObserver = Callable[[str, float, "SevStatus | None"], None]

# Whether firmware commands may run in a worker thread (trio.to_thread). Measured on the 2-core box with
# both daemons on loopback, 256 MiB private guest, 3 runs each: inline 1.2-1.6 s, threaded 1.6-2.0 s. The
# crypto does release the GIL, but with one core per daemon there is no idle core to overlap with and the
# thread hand-off per 1 MiB batch costs more than it saves; a batch is ~5 ms, short enough to keep the
# event loop (keepalives, vCPU tasks, control socket) responsive. The source must stay inline in any
# case (`run(..., thread=False)`): the guest's own vCPU task uses the same memory engine, whose cached
# `cryptography` cipher contexts must not be used from two threads at once ("Already borrowed"). Flip
# this on many-core hosts (the destination's RECEIVE_UPDATE_DATA then overlaps reading the next frame).
PSP_IN_THREAD = False


class PspRunner:
    """Runs firmware commands like the host's single PSP (see the module docstring)."""

    def __init__(self, fw: Firmware, *, in_thread: bool | None = None):
        self.fw = fw
        self.in_thread = PSP_IN_THREAD if in_thread is None else in_thread
        self.observers: list[PspObserver] = []
        #: The PSP's persistent state (PspStore: `pending()`, `async save()`), None when not persisted.
        self.store = None
        self._lock = trio.Lock()

    async def run(self, command: str, fn: Callable[[], T], *, where: str | Callable[[SevError], str] = "",
                  thread: bool = True) -> T:
        """Run `fn` (firmware command `command`) alone, then wait out the pacing debt. SevError from `fn`
        becomes FirmwareCommandError(command, status), with `where` (or `where(error)`) as context such as
        "round 2, page 0x1f".
        `thread=False` keeps `fn` on the event loop's thread even when commands may run in a worker."""
        async with self._lock:
            t0 = time.perf_counter()
            try:
                if thread and self.in_thread:
                    result = await trio.to_thread.run_sync(fn)
                else:
                    result = fn()
            except (SevError, KvmError) as exc:   # KvmError: a command through sevmigd.kvm
                self._observe(command, t0, exc.status)
                await self._persist()             # a failed sequence may have changed contexts before
                raise FirmwareCommandError(command, exc, where(exc) if callable(where) else where) from None
            except BaseException:
                await self._persist()
                raise
            self._observe(command, t0, None)
            await self._persist()
            debt = self.fw.take_pacing_debt()
        if debt > 0:
            await trio.sleep(debt)
        return result

    async def _persist(self) -> None:
        store = self.store
        if store is not None and store.pending():
            await store.save()

    async def persist_now(self) -> None:
        """Save what changed outside `run` (firmware calls made directly), with no command running."""
        async with self._lock:
            await self._persist()

    def _observe(self, command: str, t0: float, status: SevStatus | None) -> None:
        seconds = time.perf_counter() - t0
        for observe in self.observers:
            observe(command, seconds, status)


__all__ = ["PspRunner", "PspObserver", "PSP_IN_THREAD"]
