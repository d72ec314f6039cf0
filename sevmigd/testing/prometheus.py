"""A real Prometheus server for the fleet tests: scrapes daemons' /metrics, answers PromQL over HTTP.

`PrometheusServer(root, targets, listen=..., launcher=...)` writes a config that scrapes `targets`
(HOST:PORT of `metrics_listen` endpoints) every second, starts Debian's `prometheus` binary (optionally
inside a network namespace through `launcher`, e.g. `ip netns exec NS`), and returns once it logged that
it is ready. `query(expr)` runs an instant query through the HTTP API (/api/v1/query) and returns the
result vector as [(labels, float)]; `wait_for(expr, pred, timeout)` re-runs a query until `pred(result)`
(Prometheus scrapes on its own schedule, so a figure shows up there within a scrape interval or two;
this is the one place the tests poll, with a deadline). When the server runs in a namespace, the HTTP
requests are made from a short-lived Python in that same namespace.

`available()` is None when the binary is installed, else the reason to skip (`.ci/run` installs the
`prometheus` package as root). Must never: leave the process or its data directory behind (`stop()`).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence

from sevmigd.testing.daemons import READY_TIMEOUT_S

SCRAPE_INTERVAL_S = 1
QUERY_TIMEOUT_S = 30.0

_GET = ("import sys, urllib.request\n"
        "with urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])) as r:\n"
        "    sys.stdout.write(r.read().decode())\n")


def binary() -> str | None:
    return shutil.which("prometheus")


def available() -> str | None:
    """None when a Prometheus server can run here; otherwise why not."""
    if binary() is None:
        return "the prometheus server is not installed (Debian package `prometheus`; .ci/run installs it as root)"
    return None


class PrometheusServer:
    def __init__(self, root: os.PathLike | str, targets: Sequence[str], *, listen: str = "127.0.0.1:0",
                 launcher: Sequence[str] = (), job: str = "sevmigd"):
        self.root = pathlib.Path(root)
        self.targets = list(targets)
        self.launcher = list(launcher)
        self.job = job
        host, _, port = listen.rpartition(":")
        if port == "0":  # loopback: a free port (the kernel's pick, released just before prometheus binds)
            import socket

            with socket.socket() as s:
                s.bind((host, 0))
                port = str(s.getsockname()[1])
        self.address = f"{host}:{port}"
        self.proc: subprocess.Popen | None = None
        self.output: list[str] = []
        self._cond = threading.Condition()
        self._ready = False
        self._eof = False

    def __enter__(self) -> "PrometheusServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        cfg = self.root / "prometheus.yml"
        cfg.write_text(
            "global:\n"
            f"  scrape_interval: {SCRAPE_INTERVAL_S}s\n"
            f"  scrape_timeout: {SCRAPE_INTERVAL_S}s\n"
            "scrape_configs:\n"
            f"  - job_name: {json.dumps(self.job)}\n"
            "    static_configs:\n"
            f"      - targets: {json.dumps(self.targets)}\n")
        cmd = [*self.launcher, binary() or "prometheus", f"--config.file={cfg}",
               f"--storage.tsdb.path={self.root / 'data'}", f"--web.listen-address={self.address}",
               "--log.level=info"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        threading.Thread(target=self._reader, daemon=True).start()
        deadline = time.monotonic() + READY_TIMEOUT_S
        with self._cond:
            while not self._ready:
                left = deadline - time.monotonic()
                if self._eof or left <= 0:
                    tail = "".join(self.output[-30:])
                    self.stop()
                    raise RuntimeError(f"prometheus did not become ready:\n{tail}")
                self._cond.wait(left)

    def _reader(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.output.append(line)
                if "Server is ready to receive web requests" in line:
                    self._ready = True
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(20)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    def _get(self, path: str) -> dict:
        url = f"http://{self.address}{path}"
        if self.launcher:
            r = subprocess.run([*self.launcher, sys.executable, "-c", _GET, url, str(QUERY_TIMEOUT_S)],
                               capture_output=True, text=True, timeout=QUERY_TIMEOUT_S + 10)
            if r.returncode != 0:
                raise RuntimeError(f"GET {url} failed: {r.stderr[-500:]}")
            body = r.stdout
        else:
            with urllib.request.urlopen(url, timeout=QUERY_TIMEOUT_S) as resp:
                body = resp.read().decode()
        return json.loads(body)

    def query(self, expr: str) -> list[tuple[dict, float]]:
        """Instant query -> [(labels, value)] (a scalar result comes back as [({}, value)])."""
        reply = self._get("/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        if reply.get("status") != "success":
            raise RuntimeError(f"query {expr!r} failed: {reply}")
        data = reply["data"]
        if data["resultType"] == "scalar":
            return [({}, float(data["result"][1]))]
        return [(r["metric"], float(r["value"][1])) for r in data["result"]]

    def value(self, expr: str) -> float | None:
        """The one value of `expr` (None when the vector is empty)."""
        res = self.query(expr)
        if len(res) > 1:
            raise RuntimeError(f"query {expr!r} returned {len(res)} series")
        return res[0][1] if res else None

    def wait_for(self, expr: str, pred: Callable[[list[tuple[dict, float]]], bool], *,
                 timeout: float = 30.0, interval: float = 0.5) -> list[tuple[dict, float]]:
        """Re-run `expr` until pred(result) holds (see the module docstring); TimeoutError with the last
        result otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            res = self.query(expr)
            if pred(res):
                return res
            if time.monotonic() >= deadline:
                raise TimeoutError(f"prometheus: {expr!r} never satisfied the condition in {timeout} s; "
                                   f"last result {res}")
            time.sleep(interval)


__all__ = ["PrometheusServer", "available", "binary"]
