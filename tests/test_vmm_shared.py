"""The pieces a VMM process and its daemon share, in one process: the protocol codec (sevmigd/vmm/protocol.py)
and the state area (sevmigd/guest/shared.py: dirty log, bitmaps, the pause handshake, registers)."""

from __future__ import annotations

import mmap

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sevmigd.guest.memory import GuestRam
from sevmigd.guest.shared import SharedDirtyLog, StateArea, StateError, state_size
from sevmigd.guest.vcpu import reset_state
from sevmigd.guest.hypervisor import HostView
from sevmigd.vmm import protocol as vp

NPAGES, VCPUS = 64, 2


# ------------------------------------------------------------------------------------------ codec

def test_frames_round_trip_in_any_split():
    msgs = [vp.request("hello", 1, protocol=1, sevmigd="0.1"), vp.reply(1, data=b"\x00" * 5000),
            vp.error_reply(2, "GuestNotRunning", "paused")]
    wire = b"".join(vp.encode(m) for m in msgs)
    for cut in (1, 3, 4, 5, 100, len(wire) - 1):
        dec = vp.FrameDecoder()
        got = dec.feed(wire[:cut]) + dec.feed(wire[cut:])
        assert got == msgs and dec.pending == 0


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_garbage_is_a_typed_error_never_a_crash(data):
    dec = vp.FrameDecoder()
    try:
        for m in dec.feed(data):
            assert isinstance(m, dict) and isinstance(m["id"], int)
    except vp.VmmProtocolError:
        pass


def test_oversized_frame_and_bad_messages_are_refused():
    with pytest.raises(vp.VmmProtocolError, match="MAX_FRAME"):
        vp.FrameDecoder().feed((vp.MAX_FRAME + 1).to_bytes(4, "big"))
    import msgpack
    for body in ([1, 2], {"op": "hello"}, {"id": True}, {"id": "7"}):
        raw = msgpack.packb(body)
        with pytest.raises(vp.VmmProtocolError):
            vp.FrameDecoder().feed(len(raw).to_bytes(4, "big") + raw)
    with pytest.raises(vp.VmmProtocolError, match="unknown operation"):
        vp.check_request({"id": 1, "op": "format_disk"})
    with pytest.raises(vp.VmmProtocolError, match="handle"):
        vp.arg({"op": "boot", "handle": True}, "handle", int)
    assert vp.arg({"op": "boot", "handle": 3}, "handle", int) == 3


def test_vmm_ids_are_short_and_distinct_per_nonce():
    a, b = vp.vmm_id("g" * 63, b"\x00" * 4), vp.vmm_id("g" * 63, b"\x01" * 4)
    assert a != b and len(a) == 16 and a.isalnum()


# ------------------------------------------------------------------------------------------ state area

def _pair(wait=None):
    """The VMM's view and the host's view of one state mapping (as two processes would see it)."""
    buf = mmap.mmap(-1, state_size(NPAGES, VCPUS))
    vmm = StateArea(buf, npages=NPAGES, vcpus=VCPUS, init=True)
    host = StateArea(buf, npages=NPAGES, vcpus=VCPUS, wait=wait)
    return vmm, host


def test_a_fresh_area_is_all_private_unpaused_and_checked_on_attach():
    vmm, host = _pair()
    assert host.kvm_enc.all() and host.vmm_enc.all() and not host.dirty.any()
    assert not host.paused and host.throttle_pct == 0 and not host.own_bitmap
    with pytest.raises(StateError, match="pages"):
        StateArea(vmm.buf, npages=NPAGES // 2, vcpus=VCPUS)
    with pytest.raises(StateError, match="magic"):
        StateArea(mmap.mmap(-1, state_size(NPAGES, VCPUS)), npages=NPAGES, vcpus=VCPUS)


def test_dirty_log_loses_no_write_made_after_the_collect():
    vmm, host = _pair()
    vlog, hlog = SharedDirtyLog(vmm), SharedDirtyLog(host)
    vlog.mark(np.array([1, 2]))
    assert not len(hlog.get_and_clear())            # off: nothing is logged
    hlog.enabled = True
    vlog.mark(np.array([5, 9, 5]))
    vlog.mark_one(63)
    assert hlog.get_and_clear().tolist() == [5, 9, 63]
    vlog.mark(np.array([9]))                       # written again after the host's collect
    assert hlog.get_and_clear().tolist() == [9]
    assert hlog.get_and_clear().tolist() == []


def test_pause_waits_for_the_vmms_acknowledgement():
    polls = []

    def wait(pred, what):
        # what the host's bounded poll sees: not acked until the VMM passes its next tick
        polls.append(pred())
        assert vmm.vmm_may_run() is False           # the VMM's tick: acks, runs nothing
        polls.append(pred())
        assert pred(), what

    vmm, host = _pair(wait)
    assert vmm.vmm_may_run()
    host.pause()
    assert polls == [False, True] and host.paused and vmm.paused
    assert not vmm.vmm_may_run()                    # stays stopped until resume
    host.pause()                                    # already acked: no second handshake needed
    host.resume()
    assert vmm.vmm_may_run() and not host.paused
    host.pause()                                    # a new pause needs a new acknowledgement
    assert polls[-2:] == [False, True]


def test_host_view_over_the_area_sees_the_vmms_cells_and_registers():
    vmm, host = _pair(wait=lambda pred, what: None)
    ram = GuestRam(NPAGES * 4096, dirty=SharedDirtyLog(host))
    view = HostView(ram, policy=0, handle=1, vcpu_regs=[], es=False, state=host)
    vmm.msr, vmm.msr_seen = 1, True
    vmm.vmm_enc[3] = False
    vmm.own_bitmap = True
    assert view.migration_control == 1 and view.migration_control_supported
    assert view.page_enc_source == "vmm" and not view.page_enc_window(3, 1)[0]
    view.set_throttle(40)
    assert vmm.throttle_pct == 40
    regs = [reset_state(0), reset_state(1)]
    regs[0]["rip"] = 0x1234
    regs[1]["rsp"] = 0x9000
    view.set_vcpu_state(regs)                       # what a destination writes before resume_incoming
    assert view.get_vcpu_state() == regs
