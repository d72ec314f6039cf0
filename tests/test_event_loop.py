"""No blocking call in a daemon's event loop, measured with trio's instrument API (daemon/loopwatch.py).

A task step is what a task runs between two checkpoints; everything of a daemon (vCPUs, migrations,
keepalives, control requests) waits while one runs. The watch times every step. First it is shown to see
a blocking step; then real daemons run what used to block (first-start platform creation, a 1 MiB image,
reloads, the control socket's start-up probe) and a live migration with control requests beside it, and
their longest step must stay under STEP_BOUND_MS.

STEP_BOUND_MS is generous on purpose: measured on the idle 2-core development box the longest step is
~15 ms for a fresh start and ~70 ms for the launch of a 64 MiB guest or a received batch; a loaded machine
(a benchmark beside the tests) stretches steps by preemption several times over. What it must catch is a
blocking call: creating the platform in the loop took 3-5 s, a connect probe to a busy socket up to 1 s.
"""

from __future__ import annotations

import base64
import signal
import time
from types import SimpleNamespace

import pytest
import trio

from sevmigd.daemon.loopwatch import StepWatch
from sevmigd.testing.daemons import BackgroundMigration

STEP_BOUND_MS = 1000
WATCH = {"slow_step_warn_ms": STEP_BOUND_MS}


def test_the_watch_sees_a_blocking_step():
    """The rule can fail: a task that blocks for 0.5 s is the longest step, named, counted and logged (the
    other task's steps are microseconds; 0.3 s leaves room for a preempted one on a loaded machine)."""
    logged = []

    class Log:
        def warning(self, event, **kw):
            logged.append((event, kw))

    watch = StepWatch(0.3, log=Log())

    async def blocker():
        await trio.sleep(0)
        time.sleep(0.5)  # the blocking call under test
        await trio.sleep(0)

    async def polite():
        for _ in range(50):
            await trio.sleep(0)

    async def main():
        trio.lowlevel.add_instrument(watch)
        async with trio.open_nursery() as n:
            n.start_soon(polite)
            n.start_soon(blocker, name="blocker")

    trio.run(main)
    assert watch.longest_s >= 0.5 and watch.longest_task == "blocker"
    assert watch.slow_steps == 1
    assert logged == [("slow_step", {"task": "blocker", "ms": pytest.approx(watch.longest_s * 1000, abs=0.1),
                                     "warn_ms": 300.0, "slow_steps": 1})]
    assert watch.figures()["longest_step_task"] == "blocker"


def test_the_watch_logs_at_most_once_a_second():
    t = [0.0]
    logged = []

    class Log:
        def warning(self, event, **kw):
            logged.append(kw["slow_steps"])

    watch = StepWatch(0.1, clock=lambda: t[0], log=Log())
    task = SimpleNamespace(name="t")  # the hooks read only the task's name
    for step in range(30):  # 30 slow steps of 0.2 s, 0.1 s apart: 0.3 s per step -> about every 4th logged
        watch.before_task_step(task)
        t[0] += 0.2
        watch.after_task_step(task)
        t[0] += 0.1
    assert watch.slow_steps == 30
    assert logged[0] == 1 and 5 <= len(logged) <= 10


@pytest.mark.slow
def test_daemons_never_block_their_event_loop(daemons, tmp_path):
    fresh = daemons("fresh", init_platform=False, config=WATCH)   # creates its platform (RSA-4096) at start
    src = daemons("src", config=WATCH)
    dst = daemons("dst", config=WATCH)
    image = tmp_path / "image.bin"
    image.write_bytes(bytes(range(256)) * 4096)                    # 1 MiB, sent in the request as ctl does
    src.execute("launch", name="g", memory="64M", dirty_rate=4.0,
                image_b64=base64.b64encode(image.read_bytes()).decode())
    mig = BackgroundMigration(src, "g", dst.address, max_bandwidth_mib_s=32)  # ~2 s of pre-copy
    mig.wait_moving()
    requests = 0
    while mig.result is None and mig.error is None:
        mark = len(src.logs)
        for d in (src, dst):
            d.execute("server-info")
            d.execute("list")
            d.send_signal(signal.SIGHUP)   # reload: config and trusted roots re-read
            requests += 2
        src.wait_for_log("reloaded", start=mark, timeout=30)  # paces the loop without a sleep
    mig.join()
    assert mig.error is None and mig.result["status"] == "completed", mig.error
    assert requests >= 4, "the control requests did not overlap the migration"
    assert dst.execute("verify", name="g")["ok"]
    for d in (fresh, src, dst):
        info = d.execute("server-info")
        assert info["slow_steps"] == 0 and info["longest_step_ms"] < STEP_BOUND_MS, (d.name, info)
        assert not d.find_logs(lambda r: r.get("event") == "slow_step"), d.name
