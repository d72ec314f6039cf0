"""Peer baseline: QEMU's own live migration of a paused guest with random RAM, over loopback.

This is the yardstick issue 8 measures sevmigd against: the same machine, the same run, the same
guest size, plain (unencrypted) QEMU migration with unlimited bandwidth. The guest RAM is a
memory-backend-file in /dev/shm filled with random bytes, so QEMU cannot skip zero pages and must
send every byte, exactly like a guest with random contents.

QEMU is driven over QMP (JSON over a Unix socket); figures come from `query-migrate`
(`total-time`, `downtime`, `ram.transferred`, `ram.mbps`). Nothing here asserts anything: it returns
figures, or a dict with `skipped` and the reason (QEMU not installed).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time

QEMU = "qemu-system-x86_64"
# QEMU's own default is a 32 MiB/s bandwidth cap (migrate-set-parameters max-bandwidth); the
# baseline is "unlimited", which QEMU expresses as a huge max-bandwidth.
UNLIMITED_BPS = 1 << 40
POLL_S = 0.02
TIMEOUT_S = 300.0


class _Qmp:
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
        self._read()  # greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict:
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError("QMP connection closed")
            msg = json.loads(line)
            if "event" not in msg:
                return msg

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


def _qemu_cmd(mem_path: str, size: int, qmp: str, extra: list[str]) -> list[str]:
    mib = size >> 20
    return [
        QEMU, "-machine", "q35,accel=tcg", "-m", f"{mib}M", "-nodefaults", "-display", "none",
        "-object", f"memory-backend-file,id=ram0,size={mib}M,mem-path={mem_path},share=on",
        "-machine", "memory-backend=ram0", "-S",
        "-qmp", f"unix:{qmp},server=on,wait=off", *extra,
    ]


def migrate_once(size: int = 1 << 30) -> dict:
    """One QEMU migration of a paused guest of `size` bytes of random RAM; returns its figures."""
    if shutil.which(QEMU) is None:
        return {"skipped": f"{QEMU} not installed (make bench installs it with apt when it can)"}
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(prefix="sevmigd-qemu-", dir=shm) as tmp:
        src_mem, dst_mem = os.path.join(tmp, "src.ram"), os.path.join(tmp, "dst.ram")
        _fill_random(src_mem, size)
        with open(dst_mem, "wb") as f:
            f.truncate(size)
        port = _free_port()
        deadline = time.monotonic() + TIMEOUT_S
        procs = []
        qmps = []
        try:
            dst = subprocess.Popen(
                _qemu_cmd(dst_mem, size, os.path.join(tmp, "dst.qmp"),
                          ["-incoming", f"tcp:127.0.0.1:{port}"]),
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            procs.append(dst)
            src = subprocess.Popen(
                _qemu_cmd(src_mem, size, os.path.join(tmp, "src.qmp"), []),
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            procs.append(src)
            qd = _Qmp(os.path.join(tmp, "dst.qmp"), deadline)
            qmps.append(qd)
            qs = _Qmp(os.path.join(tmp, "src.qmp"), deadline)
            qmps.append(qs)
            qs.execute("migrate-set-parameters", **{"max-bandwidth": UNLIMITED_BPS,
                                                     "downtime-limit": 300})
            qs.execute("migrate", uri=f"tcp:127.0.0.1:{port}")
            while True:
                info = qs.execute("query-migrate")
                status = info.get("status")
                if status == "completed":
                    ram = info.get("ram", {})
                    total_ms = info.get("total-time")
                    return {
                        "guest_bytes": size,
                        "total_time_ms": total_ms,
                        "downtime_ms": info.get("downtime"),
                        "transferred": ram.get("transferred"),
                        "throughput_mbps": ram.get("mbps"),
                        "guest_mb_per_s": (size / 1e6) / (total_ms / 1000) if total_ms else None,
                        "qemu": subprocess.run([QEMU, "--version"], capture_output=True,
                                               text=True).stdout.splitlines()[0],
                    }
                if status in ("failed", "cancelled"):
                    return {"error": f"QEMU migration {status}: {info.get('error-desc', '')}"}
                if time.monotonic() > deadline:
                    return {"error": "QEMU migration timed out"}
                time.sleep(POLL_S)
        finally:
            for q in qmps:
                q.close()
            for p in procs:
                p.kill()
                p.wait()


def run(size: int = 1 << 30, repeats: int = 3, quick: bool = False) -> dict:
    """Median of `repeats` runs after one warm-up (figures as in migrate_once). `quick`: one 128 MiB run
    (the size of the --quick migration guests)."""
    if quick:
        size, repeats = 128 << 20, 1
    first = migrate_once(min(size, 256 << 20))  # warm-up: page cache, binary, loopback
    if "skipped" in first or "error" in first:
        return first
    runs = [migrate_once(size) for _ in range(repeats)]
    ok = [r for r in runs if "total_time_ms" in r]
    if not ok:
        return runs[-1]
    ok.sort(key=lambda r: r["total_time_ms"])
    med = dict(ok[len(ok) // 2])
    med["runs"] = [r["total_time_ms"] for r in ok]
    return med


def main() -> None:
    print(json.dumps(run(), indent=2))


if __name__ == "__main__":
    main()
