"""Peer baseline: QEMU's own live migration of a paused guest with random RAM, over loopback, in QEMU's
strongest default configuration (issue 16).

This is the yardstick the migration figures are compared with: the same machine, the same run, the same
guest size, plain QEMU migration (no TLS: QEMU's default channel is plaintext TCP) with

* **anonymous RAM on the destination** (`memory-backend-ram`): what a destination QEMU normally has; no
  tmpfs file behind it, so receiving a page costs an anonymous page fault, not a shared-file one;
* **random RAM on the source**: a `memory-backend-file` in /dev/shm filled with random bytes (QEMU 7.2
  has no command to load guest RAM from outside, so the file is how random contents get in; reading it
  is what the source's own migration thread does with any RAM), so no zero page can be skipped and every
  byte is sent, exactly like a guest with random contents;
* **`-incoming defer`, then `migrate-incoming`** on the destination (how libvirt starts one);
* **unlimited bandwidth** (QEMU's own default caps it at 32 MiB/s) and TCP on loopback.

How it is timed, the same way as sevmigd's figure (`wall_ms` in the migration section): **wall time on
this (client) side from sending `migrate` to the moment the guest is wholly on the destination**, i.e.
both QEMUs have emitted their MIGRATION event with status `completed` (events capability on, read as they
come, no polling interval). QEMU's own `total-time` (its clock, source side, ends when the source is done
sending) is reported beside it as `total_time_ms`, and `wall_source_ms` is the wall time to the source's
event alone.

Nothing here asserts anything: it returns figures, or a dict with `skipped` and the reason (QEMU not
installed).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time

QEMU = "qemu-system-x86_64"
# QEMU's own default is a 32 MiB/s bandwidth cap (migrate-set-parameters max-bandwidth); the
# baseline is "unlimited", which QEMU expresses as a huge max-bandwidth.
UNLIMITED_BPS = 1 << 40
POLL_S = 0.02
TIMEOUT_S = 300.0
#: How the two sides are configured and timed, carried into the figures so a reader of the JSON knows.
CONFIG = ("destination memory-backend-ram (anonymous), source memory-backend-file in /dev/shm with random "
          "contents, -incoming defer + migrate-incoming, unlimited bandwidth, plaintext TCP on loopback")
TIMING = ("wall_ms: client-side wall time from the migrate command to both QEMUs' MIGRATION 'completed' "
          "event (guest wholly on the destination); total_time_ms: QEMU's own total-time (source side)")


class _Qmp:
    """One QMP connection; events are queued as they arrive and can be waited for."""

    def __init__(self, path: str, deadline: float):
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.sock.close()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"QMP socket {path} never came up") from None
                time.sleep(POLL_S)
        self.file = self.sock.makefile("rwb")
        self.events: list[tuple[float, dict]] = []
        self._read()  # greeting
        self.execute("qmp_capabilities")

    def _line(self) -> dict:
        line = self.file.readline()
        if not line:
            raise ConnectionError("QMP connection closed")
        return json.loads(line)

    def _read(self) -> dict:
        while True:
            msg = self._line()
            if "event" not in msg:
                return msg
            self.events.append((time.monotonic(), msg))

    def execute(self, cmd: str, **args) -> dict:
        req = {"execute": cmd}
        if args:
            req["arguments"] = args
        self.file.write(json.dumps(req).encode() + b"\n")
        self.file.flush()
        reply = self._read()
        if "error" in reply:
            raise RuntimeError(f"QMP {cmd}: {reply['error']}")
        return reply.get("return", {})

    def wait_migration(self, deadline: float) -> tuple[float, str]:
        """Block until a MIGRATION event with a final status; -> (monotonic time it was read, status)."""
        final = ("completed", "failed", "cancelled")
        for t, ev in self.events:
            if ev.get("event") == "MIGRATION" and ev.get("data", {}).get("status") in final:
                return t, ev["data"]["status"]
        self.sock.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            while True:
                msg = self._line()
                if msg.get("event") == "MIGRATION" and msg.get("data", {}).get("status") in final:
                    return time.monotonic(), msg["data"]["status"]
        except (TimeoutError, socket.timeout):
            return time.monotonic(), "timeout"
        finally:
            self.sock.settimeout(None)

    def close(self) -> None:
        try:
            self.file.close()
        finally:
            self.sock.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fill_random(path: str, size: int) -> None:
    chunk = 16 << 20
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(chunk, left)
            f.write(os.urandom(n))
            left -= n


def _qemu_cmd(backend: str, size: int, qmp: str, extra: list[str]) -> list[str]:
    mib = size >> 20
    return [
        QEMU, "-machine", "q35,accel=tcg", "-m", f"{mib}M", "-nodefaults", "-display", "none",
        "-object", backend, "-machine", "memory-backend=ram0", "-S",
        "-qmp", f"unix:{qmp},server=on,wait=off", *extra,
    ]


def migrate_once(size: int = 1 << 30) -> dict:
    """One QEMU migration of a paused guest of `size` bytes of random RAM; returns its figures."""
    if shutil.which(QEMU) is None:
        return {"skipped": f"{QEMU} not installed (make bench installs it with apt when it can)"}
    mib = size >> 20
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(prefix="sevmigd-qemu-", dir=shm) as tmp:
        src_mem = os.path.join(tmp, "src.ram")
        _fill_random(src_mem, size)
        port = _free_port()
        deadline = time.monotonic() + TIMEOUT_S
        procs = []
        qmps = []
        try:
            dst = subprocess.Popen(
                _qemu_cmd(f"memory-backend-ram,id=ram0,size={mib}M", size, os.path.join(tmp, "dst.qmp"),
                          ["-incoming", "defer"]),
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            procs.append(dst)
            src = subprocess.Popen(
                _qemu_cmd(f"memory-backend-file,id=ram0,size={mib}M,mem-path={src_mem},share=on", size,
                          os.path.join(tmp, "src.qmp"), []),
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            procs.append(src)
            qd = _Qmp(os.path.join(tmp, "dst.qmp"), deadline)
            qmps.append(qd)
            qs = _Qmp(os.path.join(tmp, "src.qmp"), deadline)
            qmps.append(qs)
            for q in (qs, qd):
                q.execute("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
            qd.execute("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
            qs.execute("migrate-set-parameters", **{"max-bandwidth": UNLIMITED_BPS, "downtime-limit": 300})
            # The destination's event is read by a thread as it comes, the source's here.
            got: dict = {}
            waiter = threading.Thread(target=lambda: got.update(dst=qd.wait_migration(deadline)), daemon=True)
            waiter.start()
            t0 = time.monotonic()
            qs.execute("migrate", uri=f"tcp:127.0.0.1:{port}")
            t_src, status = qs.wait_migration(deadline)
            waiter.join(max(0.1, deadline - time.monotonic()))
            t_dst, dst_status = got.get("dst", (time.monotonic(), "timeout"))
            info = qs.execute("query-migrate")
            if status != "completed" or dst_status != "completed":
                return {"error": f"QEMU migration: source {status}, destination {dst_status}: "
                                 f"{info.get('error-desc', '')}"}
            ram = info.get("ram", {})
            total_ms = info.get("total-time")
            wall_ms = (max(t_src, t_dst) - t0) * 1000
            return {
                "guest_bytes": size,
                "wall_ms": round(wall_ms, 1),
                "wall_source_ms": round((t_src - t0) * 1000, 1),
                "total_time_ms": total_ms,
                "downtime_ms": info.get("downtime"),
                "transferred": ram.get("transferred"),
                "throughput_mbps": ram.get("mbps"),
                "guest_mb_per_s": round((size / 1e6) / (wall_ms / 1000), 1) if wall_ms else None,
                "qemu": subprocess.run([QEMU, "--version"], capture_output=True,
                                       text=True).stdout.splitlines()[0],
            }
        finally:
            for q in qmps:
                q.close()
            for p in procs:
                p.kill()
                p.wait()


def run(size: int = 1 << 30, repeats: int = 3, quick: bool = False) -> dict:
    """Median (by wall time) of `repeats` runs after one warm-up (figures as in migrate_once). `quick`: one
    128 MiB run (the size of the --quick migration guests)."""
    if quick:
        size, repeats = 128 << 20, 1
    first = migrate_once(min(size, 256 << 20))  # warm-up: page cache, binary, loopback
    if "skipped" in first or "error" in first:
        return first
    runs = [migrate_once(size) for _ in range(repeats)]
    ok = [r for r in runs if "wall_ms" in r]
    if not ok:
        return runs[-1]
    ok.sort(key=lambda r: r["wall_ms"])
    med = dict(ok[len(ok) // 2])
    med["runs"] = [r["wall_ms"] for r in ok]
    med["total_time_ms_runs"] = [r["total_time_ms"] for r in ok]
    med["config"] = CONFIG
    med["timing"] = TIMING
    return med


def main() -> None:
    print(json.dumps(run(), indent=2))


if __name__ == "__main__":
    main()
