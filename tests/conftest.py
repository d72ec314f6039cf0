"""Shared fixtures and marks of the test suite (the harness itself is sevmigd/testing/daemons.py).

Fixtures:
* `daemons`: a factory, `daemons(name="d0", **kwargs) -> DaemonProcess`, that starts a real `sevmigd serve`
  in `tmp_path/name` (kwargs as sevmigd.testing.daemons.start_daemon: fleet=, trust=, config=, notify=,
  launcher=, state_dir=, control=, wait=, ...) and kills and removes every daemon it started after the
  test, pass or fail. Every daemon of the test session shares one fleet unless `fleet=` names another.
* `daemon`: one ready daemon on the shared fleet.

Helpers (import them: `from conftest import seeded_firmware`): `seeded_rng(seed)`, `seeded_firmware(seed)`.

Marks (declared in pyproject.toml): `slow` for long-running tests (real migrations, fault cells; run them
alone with `-m slow`, skip them with `-m "not slow"`), `root`, `fuzz`.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable, Iterator

import pytest

from sevmigd.psp.firmware import Firmware
from sevmigd.psp.identity import FleetCA, PlatformIdentity
from sevmigd.testing.daemons import TEST_RSA_BITS, DaemonProcess, leaked_vmms, start_daemon

DaemonFactory = Callable[..., DaemonProcess]


@pytest.fixture
def daemons(tmp_path) -> Iterator[DaemonFactory]:
    """Start daemons (see the module docstring); all are cleaned up after the test."""
    started: list[DaemonProcess] = []

    def start(name: str | None = None, **kw: object) -> DaemonProcess:
        d = start_daemon(tmp_path, name or f"d{len(started)}", **kw)  # type: ignore[arg-type]
        started.append(d)
        return d

    yield start
    for d in started:
        d.cleanup()


@pytest.fixture
def daemon(daemons: DaemonFactory) -> DaemonProcess:
    """One ready daemon on the shared fleet."""
    return daemons()


# ------------------------------------------------------------------------- pure-layer helpers


def seeded_rng(seed: int) -> Callable[[int], bytes]:
    """A deterministic rng (randomness is injected, so crypto and planning are reproducible under test)."""
    return random.Random(seed).randbytes


def seeded_firmware(seed: int) -> Firmware:
    """An initialised emulated PSP whose platform (and fleet) come from `seed`: the guest and RAM tests'."""
    rng = seeded_rng(seed)
    fw = Firmware(PlatformIdentity.create(FleetCA.create(rng, rsa_bits=TEST_RSA_BITS), rng), rng=rng)
    fw.init()
    return fw


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A VMM outlives its daemon by design, so a test that forgets one leaves a guest running on the machine
    for good. Fail the run when any VMM of this run's harness daemons is still up (after a bounded wait for
    SIGKILLs in flight), and kill it."""
    deadline = time.monotonic() + 10
    while (leaked := leaked_vmms()) and time.monotonic() < deadline:
        time.sleep(0.1)   # polling an effect (SIGKILLs delivered by cleanup), bounded by the deadline
    for pid, _ in leaked:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if leaked:
        session.config.get_terminal_writer().line(
            f"\nFAILED: {len(leaked)} VMM process(es) outlived the tests: {leaked}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
