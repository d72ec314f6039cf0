"""The compiled page loop (sevmigd.psp._accel via psp/accel.py) against the pure-Python path: byte-identical
SEND packets, identical guest memory after RECEIVE, the same SevError (status and packet index) on every
tamper, the golden packet vector through both, page ranges on several threads giving the result of one
range after the other, the GIL released during a batch, and the install and the firmware working without
the compiled module at all."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sevmigd.psp import accel, crypto
from sevmigd.psp.firmware import Firmware
from sevmigd.psp.memengine import PAGE_SIZE
from sevmigd.psp.status import SevError, SevStatus

from test_firmware import launch, raises, start_migration
from conftest import seeded_rng

ROOT = Path(__file__).resolve().parent.parent
DERIVED = json.loads((ROOT / "tests/data/sev-vectors/send_receive_derived.json").read_text())
PAGES = 96                 # enough for three ranges of MIN_RANGE_PAGES (asserted below)
FUZZ = int(os.environ.get("SEVMIGD_FUZZ_EXAMPLES", "0")) or 40
HDR = crypto.HEADER_SIZE

assert PAGES >= 3 * accel.MIN_RANGE_PAGES   # so that workers=2 and 3 really split the batches below

compiled = pytest.mark.skipif(not accel.AVAILABLE, reason=accel.describe(False))


def H(s: str) -> bytes:
    return bytes.fromhex(s)


def _fw(ident, seed, *, use_accel, workers=1):
    fw = Firmware(ident, rng=seeded_rng(seed), accel=use_accel, workers=workers)
    fw.init()
    return fw


def _pair(ident_a, ident_b, *, src_accel, dst_accel, workers=1, seed=0):
    """A launched guest on a source firmware in SUPDATE and a destination in RUPDATE (same seeds, so two
    pairs built alike hold the same keys and draw the same IVs)."""
    src = _fw(ident_a, 100 + seed, use_accel=src_accel, workers=workers)
    dst = _fw(ident_b, 200 + seed, use_accel=dst_accel, workers=workers)
    h, ram, plain, _ = launch(src, pages=PAGES, seed=seed)
    dh, dram, _ = start_migration(src, h, dst, ident_b, pages=PAGES)
    return src, h, ram, plain, dst, dh, dram


@pytest.fixture(scope="module")
def ident_a():
    from sevmigd.psp.identity import FleetCA, PlatformIdentity
    return PlatformIdentity.create(FleetCA.create(seeded_rng(1), rsa_bits=2048), seeded_rng(2))


@pytest.fixture(scope="module")
def ident_b(ident_a):
    from sevmigd.psp.identity import FleetCA, PlatformIdentity
    return PlatformIdentity.create(FleetCA.create(seeded_rng(1), rsa_bits=2048), seeded_rng(3))


# --- which path ----------------------------------------------------------------------------------------

def test_the_environment_variable_forces_the_pure_path(ident_a, monkeypatch):
    monkeypatch.setenv(accel.ENV_PURE, "1")
    assert not accel.enabled() and "pure-Python" in accel.describe()
    assert Firmware(ident_a).accel is False
    monkeypatch.setenv(accel.ENV_PURE, "0")
    assert Firmware(ident_a).accel is accel.AVAILABLE
    assert Firmware(ident_a, accel=False).accel is False


# --- golden vector ----------------------------------------------------------------------------------------

@compiled
def test_golden_packet_vector_through_the_compiled_path():
    pk = DERIVED["packet"]
    tek, tik, iv, pt = H(DERIVED["tek"]), H(DERIVED["tik"]), H(pk["iv"]), H(pk["plaintext"])
    hdr, ct = accel.seal_packets(tek, tik, pk["channel_ctx"], iv, pt, len(pt))
    assert ct == H(pk["ciphertext"]) and hdr == H(pk["header_52_bytes"])
    assert (hdr, ct) == crypto.packet_seal(tek, tik, iv, pt, ctx=pk["channel_ctx"])     # the pure path
    assert accel.open_packets(tek, tik, pk["channel_ctx"], hdr, ct, len(pt)) == (1, pt)
    bad = bytearray(hdr)
    bad[30] ^= 1
    assert accel.open_packets(tek, tik, pk["channel_ctx"], bytes(bad), ct, len(pt)) == (0, b"")


@compiled
@settings(max_examples=FUZZ, deadline=None)
@given(n=st.integers(1, 6), blocks=st.integers(1, 0x5000 // 16), ctx=st.sampled_from([1, 2, 4]),
       data=st.data())
def test_transport_packets_identical_to_the_pure_path(n, blocks, ctx, data):
    plen = 16 * blocks
    tek, tik = data.draw(st.binary(min_size=16, max_size=16)), data.draw(st.binary(min_size=16, max_size=16))
    # IVs whose low 64 bits are near the wrap exercise the 128-bit counter's carry
    ivs = b"".join(data.draw(st.one_of(st.binary(min_size=16, max_size=16),
                                       st.binary(min_size=8, max_size=8).map(lambda hi: hi + b"\xff" * 8)))
                   for _ in range(n))
    pt = random.Random(data.draw(st.integers(0, 2**32))).randbytes(n * plen)
    want = [crypto.packet_seal(tek, tik, ivs[16 * i:16 * i + 16], pt[i * plen:(i + 1) * plen], ctx=ctx)
            for i in range(n)]
    hdrs, ct = accel.seal_packets(tek, tik, ctx, ivs, pt, plen)
    assert hdrs == b"".join(w[0] for w in want) and ct == b"".join(w[1] for w in want)
    assert accel.open_packets(tek, tik, ctx, hdrs, ct, plen) == (n, pt)


# --- SEND_UPDATE_DATA ---------------------------------------------------------------------------------------

@compiled
@settings(max_examples=FUZZ, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pfns=st.lists(st.integers(0, PAGES - 1), min_size=1, max_size=2 * PAGES), workers=st.integers(1, 3),
       seed=st.integers(0, 3))
def test_send_batch_is_byte_identical_to_the_pure_path(ident_a, ident_b, pfns, workers, seed):
    """Random pages (repeats too), random IVs from the seeded RNG, 1-3 engines: the same headers and
    ciphertext, and the destination (pure) opens them to the source's plaintext."""
    outs = []
    for use in (False, True):
        src, h, _ram, plain, dst, dh, dram = _pair(ident_a, ident_b, src_accel=use, dst_accel=False,
                                                  workers=workers, seed=seed)
        outs.append(src.send_update_data_batch(h, pfns))
    (h0, c0), (h1, c1) = outs
    assert h0 == h1 and isinstance(h1, bytes)
    assert bytes(c0) == bytes(c1)
    last = {p: i for i, p in enumerate(pfns)}
    dst.receive_update_data_batch(dh, pfns, h1, c1)
    eng = dst.memory_engine(dh)
    for p in last:
        assert eng.read(dram, p * PAGE_SIZE, PAGE_SIZE) == plain[p * PAGE_SIZE:(p + 1) * PAGE_SIZE]


@compiled
def test_send_batch_with_the_os_rng_and_two_engines_round_trips(ident_a, ident_b):
    src = Firmware(ident_a, rng=os.urandom, accel=True, workers=2)
    src.init()
    dst = Firmware(ident_b, rng=seeded_rng(9), accel=True, workers=2)
    dst.init()
    h, _ram, plain, _ = launch(src, pages=PAGES)
    dh, dram, _ = start_migration(src, h, dst, ident_b, pages=PAGES)
    assert src.accel and dst.accel
    pfns = np.arange(PAGES, dtype=np.uint64)
    headers, ct = src.send_update_data_batch(h, pfns)
    assert len({headers[i * HDR + 4:i * HDR + 20] for i in range(PAGES)}) == PAGES
    dst.receive_update_data_batch(dh, pfns, headers, ct)
    assert dst.memory_engine(dh).read(dram, 0, len(dram)) == plain


@compiled
def test_send_batch_errors_are_the_pure_paths(ident_a, ident_b):
    for use in (False, True):
        src, h, *_ = _pair(ident_a, ident_b, src_accel=use, dst_accel=use)
        err = raises(SevStatus.INVALID_ADDRESS, src.send_update_data_batch, h, [0, 1, PAGES, 2])
        assert err.index == 2
        assert src.send_update_data_batch(h, []) == (b"", b"")
        src.send_finish(h)
        raises(SevStatus.INVALID_GUEST_STATE, src.send_update_data_batch, h, [0])


# --- RECEIVE_UPDATE_DATA ------------------------------------------------------------------------------------

def _tamper(headers: bytes, ct, k: int, where: str, byte: int) -> tuple[bytes, bytes]:
    h, c = bytearray(headers), bytearray(ct)
    if where == "ct":
        c[k * PAGE_SIZE + byte % PAGE_SIZE] ^= 1 << (byte % 8)
    else:   # FLAGS bits other than COMPRESSED, IV, MAC: all under the MAC
        off = {"flags": 1 + byte % 3, "iv": 4 + byte % 16, "mac": 20 + byte % 32}[where]
        h[k * HDR + off] ^= 1 << (byte % 8)
    return bytes(h), bytes(c)


@compiled
@settings(max_examples=FUZZ, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(workers=st.integers(1, 3), k=st.integers(0, PAGES - 1), where=st.sampled_from(["ct", "flags", "iv", "mac"]),
       byte=st.integers(0, 4095), seed=st.integers(0, 3))
def test_tampered_batch_same_error_same_memory(ident_a, ident_b, workers, k, where, byte, seed):
    """One bad packet at k: both paths raise BAD_MEASUREMENT with index k, apply exactly packets 0..k-1
    (even when later page ranges run on other threads), and leave identical guest memory; the good batch
    then applies whole."""
    mems = []
    for use in (False, True):
        src, h, _ram, plain, dst, dh, dram = _pair(ident_a, ident_b, src_accel=False, dst_accel=use,
                                                  workers=workers, seed=seed)
        pfns = list(range(PAGES))
        headers, ct = src.send_update_data_batch(h, pfns)
        bh, bc = _tamper(headers, ct, k, where, byte)
        err = raises(SevStatus.BAD_MEASUREMENT, dst.receive_update_data_batch, dh, pfns, bh, bc)
        assert err.index == k
        eng = dst.memory_engine(dh)
        assert eng.read(dram, 0, k * PAGE_SIZE) == plain[:k * PAGE_SIZE]
        assert bytes(dram[k * PAGE_SIZE:]) == bytes((PAGES - k) * PAGE_SIZE)
        mems.append(bytes(dram))
        dst.receive_update_data_batch(dh, pfns, headers, ct)
        assert eng.read(dram, 0, len(dram)) == plain
        mems.append(bytes(dram))
    assert mems[0] == mems[2] and mems[1] == mems[3]


@compiled
@pytest.mark.parametrize("workers", [1, 2])
def test_receive_checks_before_the_mac_are_the_pure_paths(ident_a, ident_b, workers):
    """COMPRESSED and a page outside guest memory fail first, with the same status and index."""
    for use in (False, True):
        src, h, _ram, plain, dst, dh, dram = _pair(ident_a, ident_b, src_accel=False, dst_accel=use,
                                                  workers=workers)
        pfns = list(range(PAGES))
        headers, ct = src.send_update_data_batch(h, pfns)
        comp = bytearray(headers)
        comp[40 * HDR] |= crypto.FLAG_COMPRESSED
        bad_ct = bytearray(ct)
        bad_ct[50 * PAGE_SIZE] ^= 1
        err = raises(SevStatus.UNSUPPORTED, dst.receive_update_data_batch, dh, pfns, bytes(comp), bytes(bad_ct))
        assert err.index == 40
        far = pfns[:60] + [PAGES] + pfns[61:]
        err = raises(SevStatus.INVALID_ADDRESS, dst.receive_update_data_batch, dh, far, headers, ct)
        assert err.index == 60
        # a bad MAC before the bad address is the first failure
        err = raises(SevStatus.BAD_MEASUREMENT, dst.receive_update_data_batch, dh, far, headers, bytes(bad_ct))
        assert err.index == 50
        raises(SevStatus.INVALID_LENGTH, dst.receive_update_data_batch, dh, pfns, headers[:-1], ct)
        assert dst.memory_engine(dh).read(dram, 0, 40 * PAGE_SIZE) == plain[:40 * PAGE_SIZE]


@compiled
@pytest.mark.parametrize("workers", [1, 2])
def test_repeated_pages_later_packets_win(ident_a, ident_b, workers):
    """A page sent twice in one batch (old and new content): the later packet's content stays, on both
    paths, whatever the number of engines."""
    mems = []
    for use in (False, True):
        src, h, ram, plain, dst, dh, dram = _pair(ident_a, ident_b, src_accel=False, dst_accel=use,
                                                 workers=workers)
        first = list(range(PAGES))
        h1, c1 = src.send_update_data_batch(h, first)
        src.memory_engine(h).write(ram, 5 * PAGE_SIZE, b"\x42" * PAGE_SIZE)    # the guest changes page 5
        h2, c2 = src.send_update_data_batch(h, [5])
        pfns = first + [5] + first[40:]
        dst.receive_update_data_batch(dh, pfns, h1 + h2 + h1[40 * HDR:], bytes(c1) + bytes(c2) + bytes(c1)[40 * PAGE_SIZE:])
        eng = dst.memory_engine(dh)
        assert eng.read(dram, 5 * PAGE_SIZE, PAGE_SIZE) == b"\x42" * PAGE_SIZE
        mems.append(bytes(dram))
    assert mems[0] == mems[1]


# --- the GIL ---------------------------------------------------------------------------------------------------

@compiled
def test_a_batch_releases_the_gil():
    """Another Python thread makes progress *during* one compiled batch call. The switch interval is set
    so long that the main thread is never forced to hand over the GIL; the other thread gives it back
    after every step (sleep(0)). So between the two reads of the count the other thread can only run if
    the call itself released the GIL; a C call that keeps it (`sum(range(...))`) shows the count stand
    still under the same conditions."""
    from sevmigd.psp import _accel

    n = 2048
    vek, tek, tik = os.urandom(32), os.urandom(16), os.urandom(16)
    ram = bytearray(n * PAGE_SIZE)
    pfns = np.arange(n, dtype=np.int64)
    ivs = os.urandom(16 * n)
    hdrs, out = bytearray(n * HDR), bytearray(n * PAGE_SIZE)
    count = [0]
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            count[0] += 1
            time.sleep(0)

    old = sys.getswitchinterval()
    sys.setswitchinterval(30.0)
    t = threading.Thread(target=spin)
    t.start()
    try:
        before = count[0]
        sum(range(3_000_000))                      # C, GIL held: the other thread cannot run
        held = count[0] - before
        moved = 0
        for _ in range(50):                        # the other thread must also get a core (loaded machine)
            before = count[0]
            _accel.send_pages(vek, tek, tik, crypto.CTX_UPDATE, ram, pfns, ivs, hdrs, out, 1)
            moved = count[0] - before
            if moved:
                break
    finally:
        stop.set()
        sys.setswitchinterval(old)
        t.join()
    assert held == 0 and moved > 0


# --- without the compiled module -------------------------------------------------------------------------

def test_firmware_runs_the_pure_path_when_the_module_is_missing():
    """In a fresh interpreter where importing sevmigd.psp._accel fails (as after an install without a
    compiler): accel.AVAILABLE is false, a firmware built with accel=True still runs, and pages move."""
    code = r"""
import sys, random
sys.modules["sevmigd.psp._accel"] = None          # import raises ImportError
sys.path.insert(0, sys.argv[1])
from sevmigd.psp import accel
from sevmigd.psp.firmware import Firmware
from test_firmware import launch, start_migration
from sevmigd.psp.identity import FleetCA, PlatformIdentity
from conftest import seeded_rng
assert not accel.AVAILABLE and "not built" in accel.describe()
ca = FleetCA.create(seeded_rng(1), rsa_bits=2048)
a, b = PlatformIdentity.create(ca, seeded_rng(2)), PlatformIdentity.create(ca, seeded_rng(3))
src, dst = Firmware(a, rng=seeded_rng(4), accel=True, workers=2), Firmware(b, rng=seeded_rng(5), accel=True, workers=2)
src.init(); dst.init()
assert src.accel is False
h, ram, plain, _ = launch(src, pages=8)
dh, dram, _ = start_migration(src, h, dst, b, pages=8)
hd, ct = src.send_update_data_batch(h, list(range(8)))
dst.receive_update_data_batch(dh, list(range(8)), hd, ct)
assert dst.memory_engine(dh).read(dram, 0, len(dram)) == plain
print("pure ok")
"""
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "tests")], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "pure ok" in out.stdout


def test_the_build_without_a_compiler_does_not_fail(tmp_path):
    """setup.py's extension is optional: with a compiler that always fails, building the extensions
    still succeeds (a warning), and no module is produced; the install then goes on without it."""
    env = dict(os.environ, CC=str(Path("/bin/false")), LDSHARED=str(Path("/bin/false")))
    out = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"),
                          "--build-temp", str(tmp_path / "tmp")], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert not list((tmp_path).rglob("_accel*.so"))
    assert "_accel" in out.stderr + out.stdout     # setuptools says which extension it skipped


@pytest.mark.parametrize("workers", [1, 3])
def test_the_daemons_psp_gets_psp_workers_from_its_config(tmp_path, workers):
    """`psp_workers` reaches the firmware the daemon builds (the daemon's own PSP, not an injected one)."""
    from sevmigd.daemon.config import Config, TlsConfig
    from sevmigd.daemon.server import Daemon
    from sevmigd.psp.identity import FleetCA
    from sevmigd.testing.pki import provision

    ca = FleetCA.create(seeded_rng(7), rsa_bits=2048)
    identity = provision(tmp_path / "h", ca)
    config = Config(state_dir=str(tmp_path / "h"), control=str(tmp_path / "h.sock"), tls=TlsConfig(),
                    insecure_plaintext=True, psp_workers=workers)
    d = Daemon(config, identity=identity, trusted_roots=[ca.ark])
    d._load_platform()
    assert d.fw.workers == workers and d.fw.accel is accel.enabled()
