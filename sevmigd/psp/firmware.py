"""The emulated AMD Secure Processor (SEV firmware), one method per SEV command.

Owns: the platform state (UNINIT / INIT / WORKING), guest contexts (handle, policy, ASID, VEK, launch
digest, channel TEK/TIK) and the guest state machine (reference §2.5), with the firmware's checks in the
firmware's order and its status codes (reference §2.4, AMD-ASPFW `sev_mcmd.c`). Every failure raises
`SevError(status)`; length-query paths carry the lengths the firmware writes back (`err.written_back`).

Must never: let a key (VEK, TEK, TIK, PDH private key) reach a repr, an exception or a log; do I/O, sleep
or read a clock other than the injected one; hand a `MemoryEngine` to host-side code (only
`memory_engine()` does, for the guest side).

Emulation extras, where real hardware has wiring instead of commands:

* ``map_guest_memory(handle, ram, vmsa)`` stands for the ASID / C-bit wiring: guest-physical address =
  offset in ``ram`` (raw "DRAM" bytes, ciphertext for private data). SEND/RECEIVE/LAUNCH/DBG commands
  address guest memory through it.
* SEV-ES: one VMSA page per vCPU, as on hardware. Each is a separate 4096-byte buffer (mapped with
  ``map_guest_memory(handle, ram, vmsa=[page0, page1, ...])``), encrypted under the VEK at the pseudo
  address ``vmsa_paddr(vcpu)`` = ``VMSA_PADDR - vcpu * 4096`` (the top of the 64-bit space, never a RAM
  offset, so a VMSA ciphertext can never be replayed into RAM, into another vCPU's page, or back).
  Hardware names the page by its system physical address in LAUNCH/SEND/RECEIVE_UPDATE_VMSA; here
  the commands take the vCPU index instead (``vcpu=``, default 0).
* VMSA layout (shared with `sevmigd.guest.vcpu`): registers at the SEV-ES save-area offsets, bytes
  ``VMSA_RESERVED_OFFSET .. 4095`` a reserved trailer that must be zero. SEND_UPDATE_VMSA "validates the
  VMSA" (reference §4) by that rule and fails with INVALID_PARAM; RECEIVE_UPDATE_VMSA's "VMSA set-up"
  applies the same check after the MAC verifies.
* Reference §9 item 3 (UNCONFIRMED whether SEND/RECEIVE_UPDATE_VMSA accept lengths other than 4096):
  we reject any other length with INVALID_LENGTH, as LAUNCH_UPDATE_VMSA does.
* DECOMMISSION of a guest that is still activated fails with ACTIVE, as the firmware does
  (`mcmd_decommission_common`); call ``deactivate`` first (KVM does DEACTIVATE, DF_FLUSH, DECOMMISSION).
* ASID reuse: an ASID that was DEACTIVATEd holds the old guest's lines in the data fabric until a
  DF_FLUSH; ACTIVATE on it before then fails with DF_FLUSH_REQUIRED, and DF_FLUSH itself fails with
  WBINVD_REQUIRED unless the host ran WBINVD on every core since the last DEACTIVATE (``wbinvd()``, an
  emulation extra standing for the instruction; KVM's `sev_flush_asids` does wbinvd_on_all_cpus() then
  DF_FLUSH). ``df_flush_count`` counts the flushes, so tests can see that reuse waited for one.
* DBG_DECRYPT / DBG_ENCRYPT check no guest state ("being active covers it", FW): platform WORKING,
  handle, NODBG (POLICY_FAILURE), active (INACTIVE), 16-byte alignment and length.
* LAUNCH_START without a GODH certificate opens no channel: TEK/TIK stay zero (reference §2.4) and
  the policy's API version and reserved bits are still checked (reference §6).
* Batch forms ``send_update_data_batch`` / ``receive_update_data_batch`` do the state checks once and
  the per-packet checks per packet, and produce the same bytes as N single commands.
* Persistence (issue 17): the PSP keeps its guest contexts across a restart of the host software, so
  ``export_guest(handle)`` seals a context (sevmigd.psp.seal, under the ``sealing_key`` of this runtime
  directory) and ``import_guest(blob)`` re-creates it with the same handle, state, keys, ASID binding,
  measurement and open channel; ``export_flush_state`` / ``import_flush_state`` do the same for the ASIDs
  awaiting DF_FLUSH. ``take_changes()`` tells the daemon's store which contexts a command changed (the
  per-page commands change none). ``key_slot(handle)`` is the VEK sealed for the VMM process (the CPU),
  opened by ``sevmigd.psp.keyslot``. The launch digest is kept as the measured bytes (hashlib exports no
  midstate), hashed at LAUNCH_MEASURE.
* The batch forms run the compiled page loop (`sevmigd.psp.accel`, byte-identical) when it was built,
  else the pure-Python one; ``accel=False`` forces the pure path. With ``workers`` > 1 one batch command
  is split into page ranges run by several threads at once, like a PSP feeding its CCP's queues: still
  one command at a time, with the result of the ranges run in order (see accel.py).
* Pacing: with ``min_command_time`` > 0 each command adds ``max(0, min - elapsed)`` seconds (a batch of N
  pages: ``N * min - elapsed``) to a debt that the daemon awaits (``take_pacing_debt()``); the firmware
  itself never sleeps.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import os
import struct
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

import msgpack

from . import accel as psp_accel, chain, crypto, seal
from .certs import SEV_CERT_SIZE, SevCert, Usage, sev_signer, verify_sev_cert
from .memengine import PAGE_SIZE, VEK_SIZE, MemoryEngine
from .policy import RESERVED_MASK, Policy, policy_api
from .status import SevError, SevStatus

Rng = Callable[[int], bytes]

# --- limits (reference §2.3, §2.4) -----------------------------------------------------------------------
#: Guest handles are 1..MAX_HANDLES; LAUNCH_START/RECEIVE_START past that → RESOURCE_LIMIT.
MAX_HANDLES = 1024
#: ASIDs usable by SEV guests (EPYC 7003 "Milan" reports 509 in CPUID 0x8000001F ECX).
MAX_ASID = 509
SESSION_LEN = crypto.SESSION_SIZE          # 0x80
HDR_LEN = crypto.HEADER_SIZE               # 0x34
MEASURE_LEN = crypto.MEASUREMENT_SIZE      # 0x30
PDH_CERT_LEN = SEV_CERT_SIZE               # 0x824
CERT_CHAIN_LEN = chain.PLAT_CERTS_SIZE     # 0x186C
MAX_PACKET = crypto.MAX_PACKET             # 0x5000

VMSA_SIZE = 4096
#: Pseudo physical address under which vCPU 0's VMSA page is encrypted (see module docstring).
VMSA_PADDR = 0xFFFF_FFFF_FFFF_F000
#: vCPUs (VMSA pages) per guest the firmware accepts in map_guest_memory.
MAX_VMSAS = 1024


def vmsa_paddr(vcpu: int) -> int:
    """The pseudo address vCPU `vcpu`'s VMSA is encrypted at (each vCPU its own 4 KiB page)."""
    return VMSA_PADDR - vcpu * VMSA_SIZE
#: First byte of the VMSA's reserved trailer (must be zero for the VMSA to be valid).
VMSA_RESERVED_OFFSET = 0xC00


class PlatformState(enum.IntEnum):
    UNINIT = 0
    INIT = 1
    WORKING = 2


class GuestState(enum.IntEnum):
    """Firmware values (KVM's documentation swaps 4 and 5; the firmware byte is what counts)."""

    UNINIT = 0
    LUPDATE = 1
    LSECRET = 2
    RUNNING = 3
    SUPDATE = 4
    RUPDATE = 5
    SENT = 6


#: GET_ID output per socket: x ‖ y of the chip-unique secp256k1 public key (FW `get_id_t`).
GET_ID_LEN = 64
#: PLATFORM_STATUS `platform_flags` bit 0: the platform is owned externally (PEK_CERT_IMPORT).
PLATFORM_FLAG_OWNER = 0x01
#: PLATFORM_STATUS `config_flags` bit 0: SEV-ES initialised (the kernel's `flags` u32 sees it as 0x100).
CONFIG_FLAG_ES = 0x01


@dataclass(frozen=True)
class PlatformStatus:
    """PLATFORM_STATUS output (FW `sev_mcmd_platform_status_t`, 12 bytes)."""

    api_major: int
    api_minor: int
    state: PlatformState
    owner: int         # platform_flags: PLATFORM_FLAG_OWNER when externally owned
    config: int        # config_flags: CONFIG_FLAG_ES when SEV-ES is initialised
    build: int
    guest_count: int

    @property
    def externally_owned(self) -> bool:
        return bool(self.owner & PLATFORM_FLAG_OWNER)

    @property
    def es(self) -> bool:
        return bool(self.config & CONFIG_FLAG_ES)

    def encode(self) -> bytes:
        """The command buffer as the firmware writes it: api_major u8, api_minor u8, state u8,
        platform_flags u8, config_flags u16, reserved u8, build_id u8, guest_count u32 (LE)."""
        return struct.pack("<BBBBHBBI", self.api_major, self.api_minor, int(self.state), self.owner,
                           self.config, 0, self.build, self.guest_count)


@dataclass(frozen=True)
class GuestStatus:
    """GUEST_STATUS output."""

    policy: int
    asid: int
    state: GuestState


def vmsa_is_valid(vmsa: bytes) -> bool:
    """A VMSA page is valid when it is 4096 bytes and its reserved trailer is all zero."""
    return len(vmsa) == VMSA_SIZE and not any(bytes(vmsa[VMSA_RESERVED_OFFSET:]))


def key_slot_binding(handle: int, asid: int) -> bytes:
    """The clear binding of a key slot blob: handle u16 ‖ ASID u16 (LE), authenticated by the seal."""
    return struct.pack("<HH", handle, asid)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _opt_bytes(v, n: int) -> bool:
    return v is None or (isinstance(v, bytes) and len(v) == n)


def _decode_context(plain: bytes) -> dict:
    """The fields of a sealed guest context, checked; SealError("damaged") for anything else (a blob that
    authenticates was made by export_guest, so this guards against another version's layout)."""
    try:
        c = msgpack.unpackb(plain)
        ok = (isinstance(c, dict) and _is_int(c["handle"]) and 1 <= c["handle"] <= MAX_HANDLES
              and _is_int(c["policy"]) and 0 <= c["policy"] <= 0xFFFFFFFF
              and _is_int(c["state"]) and c["state"] in GuestState._value2member_map_
              and isinstance(c["active"], bool) and _is_int(c["asid"])
              and (1 <= c["asid"] <= MAX_ASID if c["active"] else c["asid"] == 0)
              and isinstance(c["vek"], bytes) and len(c["vek"]) == VEK_SIZE
              and _opt_bytes(c["tek"], crypto.KEY_SIZE) and _opt_bytes(c["tik"], crypto.KEY_SIZE)
              and (c["tek"] is None) == (c["tik"] is None)
              and isinstance(c["measured"], bytes)
              and _opt_bytes(c["final_digest"], 32) and _opt_bytes(c["measure"], 32))
    except Exception:
        ok = False
    if not ok:
        raise seal.SealError(SevStatus.SECURE_DATA_INVALID, "damaged", "not a guest context")
    return c


class _Guest:
    """One guest context. Holds keys: never printed."""

    __slots__ = ("handle", "policy", "state", "asid", "active", "vek", "engine", "channel", "measured",
                 "final_digest", "measure", "ram", "ram_view", "vmsa")

    def __init__(self, handle: int, policy: int, vek: bytes, engine: MemoryEngine):
        self.handle = handle
        self.policy = policy
        self.state = GuestState.UNINIT
        self.asid = 0
        self.active = False
        self.vek = vek
        self.engine = engine
        self.channel: crypto.TransportKeys | None = None
        # What LAUNCH_UPDATE_DATA/_VMSA measured so far (the launch digest is its SHA-256): kept as bytes,
        # not as a running hashlib state, because hashlib cannot export a midstate and a context exported
        # in LUPDATE must continue byte-exact (export_guest). Emptied by LAUNCH_MEASURE.
        self.measured = bytearray()
        self.final_digest: bytes | None = None
        self.measure: bytes | None = None
        self.ram = None
        self.ram_view: np.ndarray | None = None
        self.vmsa: list | None = None    # one 4096-byte buffer per vCPU (SEV-ES)

    @property
    def es(self) -> bool:
        return bool(self.policy & Policy.ES)

    def __repr__(self) -> str:
        return f"<guest {self.handle} {self.state.name} asid={self.asid}>"


def _command(pages: Callable[..., int] | None = None):
    """Wrap a firmware command with pacing: debt += max(0, n * min_command_time - elapsed)."""

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(self, *args, **kwargs):
            if self._min_command_time <= 0:
                return fn(self, *args, **kwargs)
            start = self._clock()
            try:
                return fn(self, *args, **kwargs)
            finally:
                n = pages(*args, **kwargs) if pages is not None else 1
                elapsed = self._clock() - start
                self._pacing_debt += max(0.0, n * self._min_command_time - elapsed)

        return wrapper

    return deco


def _batch_pages(handle, pfns, *rest, **kw) -> int:
    try:
        return max(1, len(pfns))
    except TypeError:
        return 1


class Firmware:
    """The emulated PSP of one host. See the module docstring for what is emulated how."""

    def __init__(self, identity, *, rng: Rng = os.urandom, api_major: int | None = None,
                 api_minor: int | None = None, build: int = 25, es_initialized: bool = True,
                 min_command_time: float = 0.0, clock: Callable[[], float] | None = None,
                 sealing_key: bytes | None = None, accel: bool | None = None, workers: int = 1):
        self.identity = identity
        # The key of every blob this PSP seals (export_guest, key_slot, export_flush_state): one per
        # runtime directory, kept by the daemon's store (sevmigd.daemon.pspstate). Without one, a random
        # key is drawn at the first seal (blobs then only open in this Firmware).
        self._sealing_key = None if sealing_key is None else seal.check_key(sealing_key)
        self._rng = rng
        self.api_major = identity.api_major if api_major is None else api_major
        self.api_minor = identity.api_minor if api_minor is None else api_minor
        self.build = build
        self.es_initialized = es_initialized
        self._min_command_time = float(min_command_time)
        self._clock = clock if clock is not None else time.monotonic
        self._pacing_debt = 0.0
        # The batch page loop: compiled when built and not switched off (None: SEVMIGD_PSP_PURE decides),
        # split over `workers` threads (psp/accel.py). Both give the bytes of the pure path.
        self.accel = psp_accel.enabled() if accel is None else bool(accel) and psp_accel.AVAILABLE
        self.workers = max(1, int(workers))
        self._state = PlatformState.UNINIT
        self._guests: dict[int, _Guest] = {}
        self._asids: dict[int, int] = {}   # asid -> handle
        self._asids_unflushed: set[int] = set()   # DEACTIVATEd since the last DF_FLUSH
        self._wbinvd_needed = False               # a DEACTIVATE happened since the last WBINVD
        self.df_flush_count = 0
        # Persistence bookkeeping (take_changes): handles whose context a command changed (created,
        # state, ASID binding, channel, measurement, decommissioned) and whether the ASID flush state did.
        # The per-page commands (SEND/RECEIVE_UPDATE_DATA, LAUNCH_SECRET, DBG_*) change neither.
        self._changed: set[int] = set()
        self._flush_changed = False

    def __repr__(self) -> str:
        return (f"<Firmware {self._state.name} api={self.api_major}.{self.api_minor} build={self.build} "
                f"guests={len(self._guests)}>")

    # ------------------------------------------------------------------------------------------------
    # helpers
    # ------------------------------------------------------------------------------------------------
    @property
    def platform_state(self) -> PlatformState:
        return self._state

    @property
    def guest_count(self) -> int:
        return len(self._guests)

    def take_pacing_debt(self) -> float:
        """Seconds the caller must still wait to model a slow PSP; resets the debt."""
        debt, self._pacing_debt = self._pacing_debt, 0.0
        return debt

    def _rand(self, n: int) -> bytes:
        b = bytes(self._rng(n))
        if len(b) != n:
            raise SevError(SevStatus.HWERROR_PLATFORM, "RNG returned the wrong number of bytes")
        return b

    def _need_platform(self, *states: PlatformState) -> None:
        if self._state not in states:
            raise SevError(SevStatus.INVALID_PLATFORM_STATE, f"platform is {self._state.name}")

    def _guest(self, handle: int) -> _Guest:
        g = self._guests.get(handle) if isinstance(handle, int) else None
        if g is None:
            raise SevError(SevStatus.INVALID_GUEST, f"no guest with handle {handle!r}")
        return g

    @staticmethod
    def _need_state(g: _Guest, *states: GuestState) -> None:
        if g.state not in states:
            raise SevError(SevStatus.INVALID_GUEST_STATE, f"guest {g.handle} is {g.state.name}")

    @staticmethod
    def _need_active(g: _Guest) -> None:
        if not g.active:
            raise SevError(SevStatus.INACTIVE, f"guest {g.handle} is not activated")

    @staticmethod
    def _need_es(g: _Guest) -> None:
        if not g.es:
            raise SevError(SevStatus.UNSUPPORTED, f"guest {g.handle} is not an SEV-ES guest")

    @staticmethod
    def _need_ram(g: _Guest, paddr: int, length: int) -> None:
        if g.ram is None or paddr < 0 or paddr + length > len(g.ram):
            raise SevError(SevStatus.INVALID_ADDRESS, "range is outside the guest's memory")

    @staticmethod
    def _need_vmsa(g: _Guest, vcpu: int):
        """vCPU `vcpu`'s VMSA buffer, or INVALID_ADDRESS (no such page mapped)."""
        if g.vmsa is None or isinstance(vcpu, bool) or not isinstance(vcpu, int) or not 0 <= vcpu < len(g.vmsa):
            raise SevError(SevStatus.INVALID_ADDRESS, f"guest {g.handle} has no VMSA page for vCPU {vcpu!r}")
        return g.vmsa[vcpu]

    def _check_policy(self, policy: int) -> None:
        """Reference §3.4 steps 2–3: API version <= ours, reserved bits zero (POLICY_FAILURE)."""
        if policy_api(policy) > (self.api_major, self.api_minor):
            raise SevError(SevStatus.POLICY_FAILURE, "policy requires a newer firmware API")
        if policy & RESERVED_MASK:
            raise SevError(SevStatus.POLICY_FAILURE, "reserved policy bits are set")

    def _open_server_channel(self, peer_cert: bytes, session: bytes, policy: int) -> crypto.TransportKeys:
        """LAUNCH_START / RECEIVE_START: ECDH(our PDH, peer), unwrap TEK/TIK, verify POLICY_MAC."""
        peer = chain.pdh_sanity_check(bytes(peer_cert))
        z = crypto.ecdh_z(self.identity.pdh_private, peer)
        tek, tik = crypto.open_session(z, bytes(session))
        crypto.verify_policy_mac(tik, bytes(session), policy)
        return crypto.TransportKeys(tek, tik)

    def _new_guest(self, policy: int, share_handle: int) -> _Guest:
        """Key sharing, handle allocation, ES check (shared by LAUNCH_START and RECEIVE_START)."""
        if share_handle:
            other = self._guest(share_handle)
            if other.policy != policy or other.policy & Policy.NOKS:
                raise SevError(SevStatus.POLICY_FAILURE, "key sharing refused by policy (NOKS or different policy)")
            vek, engine = other.vek, other.engine
        else:
            vek = None
            engine = None
        handle = next((h for h in range(1, MAX_HANDLES + 1) if h not in self._guests), None)
        if handle is None:
            raise SevError(SevStatus.RESOURCE_LIMIT, "no free guest handle")
        if policy & Policy.ES and not self.es_initialized:
            raise SevError(SevStatus.UNSUPPORTED, "SEV-ES guest on a platform without SEV-ES")
        if vek is None:
            vek = self._rand(VEK_SIZE)
            engine = MemoryEngine(vek)
        return _Guest(handle, policy, vek, engine)

    @staticmethod
    def _check_u32(name: str, value: int) -> None:
        if not isinstance(value, int) or not 0 <= value <= 0xFFFFFFFF:
            raise SevError(SevStatus.INVALID_PARAM, f"{name} is not a u32")

    # ------------------------------------------------------------------------------------------------
    # platform commands
    # ------------------------------------------------------------------------------------------------
    @_command()
    def init(self) -> None:
        """INIT: UNINIT → INIT."""
        self._need_platform(PlatformState.UNINIT)
        self._state = PlatformState.INIT

    @_command()
    def shutdown(self) -> None:
        """SHUTDOWN: any state → UNINIT; every guest context is destroyed."""
        self._changed.update(self._guests)
        self._flush_changed = True
        self._guests.clear()
        self._asids.clear()
        self._asids_unflushed.clear()
        self._state = PlatformState.UNINIT

    @_command()
    def pdh_cert_export(self, pdh_cert_len: int = PDH_CERT_LEN, certs_len: int = CERT_CHAIN_LEN) -> tuple[bytes, bytes]:
        """PDH_CERT_EXPORT → (PDH cert, PEK ‖ OCA ‖ CEK) with the CEK unsigned (as Rome+ firmware)."""
        self._need_platform(PlatformState.INIT, PlatformState.WORKING)
        if pdh_cert_len < PDH_CERT_LEN or certs_len < CERT_CHAIN_LEN:
            raise SevError(SevStatus.INVALID_LENGTH, "buffers too small",
                           pdh_cert_len=PDH_CERT_LEN, certs_len=CERT_CHAIN_LEN)
        ident = self.identity
        chain_bytes = ident.pek.encode() + ident.oca.encode() + ident.cek.without_signatures().encode()
        return ident.pdh.encode(), chain_bytes

    @_command()
    def pek_gen(self) -> None:
        """PEK_GEN (INIT only): new OCA, PEK and PDH."""
        self._need_platform(PlatformState.INIT)
        self.identity = self.identity.pek_gen(self._rng)

    @_command()
    def pdh_gen(self) -> None:
        """PDH_GEN (INIT or WORKING): new PDH signed by the PEK."""
        self._need_platform(PlatformState.INIT, PlatformState.WORKING)
        self.identity = self.identity.pdh_gen(self._rng)

    @_command()
    def platform_reset(self) -> None:
        """PLATFORM_RESET (UNINIT only): the persistent OCA, PEK and PDH are deleted; the platform is
        self-owned again. The CEK (chip-derived) and GET_ID do not change.

        Hardware deletes the store and regenerates OCA/PEK/PDH at the next INIT; we regenerate at once,
        which no command can tell apart (every command that reads them needs INIT or WORKING)."""
        self._need_platform(PlatformState.UNINIT)
        self.identity = self.identity.reset(self._rng)

    @_command()
    def platform_status(self) -> PlatformStatus:
        """PLATFORM_STATUS (any state). In UNINIT the owner and ES flags and the guest count read 0
        ("invalid if we aren't initialized", FW `sev_mcmd_platform_status`)."""
        up = self._state != PlatformState.UNINIT
        return PlatformStatus(
            api_major=self.api_major, api_minor=self.api_minor, state=self._state,
            owner=PLATFORM_FLAG_OWNER if up and self.identity.externally_owned else 0,
            config=CONFIG_FLAG_ES if up and self.es_initialized else 0,
            build=self.build, guest_count=len(self._guests) if up else 0)

    @_command()
    def pek_csr(self, csr_len: int = PDH_CERT_LEN) -> bytes:
        """PEK_CSR (INIT or WORKING) → the PEK certificate with both signature slots empty."""
        self._need_platform(PlatformState.INIT, PlatformState.WORKING)
        if csr_len < PDH_CERT_LEN:
            raise SevError(SevStatus.INVALID_LENGTH, "CSR buffer too small", csr_len=PDH_CERT_LEN)
        return self.identity.pek_csr().encode()

    @_command()
    def pek_cert_import(self, pek_cert: bytes, oca_cert: bytes) -> None:
        """PEK_CERT_IMPORT (INIT only): take ownership by the OCA that signed our PEK CSR.

        FW `sev_mcmd_pek_cert_import` order: platform INIT (INVALID_PLATFORM_STATE); not already
        externally owned (ALREADY_OWNED); both lengths exactly 0x824 (INVALID_LENGTH); OCA valid and
        self-signed; PEK signed by that OCA (INVALID_CERTIFICATE / BAD_SIGNATURE); PEK body equal to
        ours byte for byte (INVALID_CERTIFICATE); then the CEK signature moves into the free slot,
        PEK + OCA are stored, the platform is externally owned and the PDH is regenerated."""
        self._need_platform(PlatformState.INIT)
        if self.identity.externally_owned:
            raise SevError(SevStatus.ALREADY_OWNED, "the platform is already externally owned (PLATFORM_RESET first)")
        if len(pek_cert) != PDH_CERT_LEN or len(oca_cert) != PDH_CERT_LEN:
            raise SevError(SevStatus.INVALID_LENGTH, "PEK and OCA certificates must be 0x824 bytes each")
        oca = SevCert.decode(bytes(oca_cert))
        pek = SevCert.decode(bytes(pek_cert))
        if oca.pubkey_usage != Usage.OCA:
            raise SevError(SevStatus.INVALID_CERTIFICATE, "the OCA certificate's usage is not OCA")
        oca_signer = sev_signer(oca)
        verify_sev_cert(oca, oca_signer, "OCA")
        verify_sev_cert(pek, oca_signer, "PEK")
        if pek.body() != self.identity.pek.body():
            raise SevError(SevStatus.INVALID_CERTIFICATE, "the PEK is not this platform's PEK (body differs)")
        self.identity = self.identity.pek_cert_import(pek, oca, self._rng)

    @_command()
    def get_id(self, id_len: int = GET_ID_LEN) -> bytes:
        """GET_ID (any platform state) → 64 bytes for this one-socket platform (see
        `PlatformIdentity.get_id`); a short buffer gets INVALID_LENGTH with id_len = 64 written back."""
        if id_len < GET_ID_LEN:
            raise SevError(SevStatus.INVALID_LENGTH, "ID buffer too small", id_len=GET_ID_LEN)
        return self.identity.get_id()

    # ------------------------------------------------------------------------------------------------
    # guest management
    # ------------------------------------------------------------------------------------------------
    @_command()
    def activate(self, handle: int, asid: int) -> None:
        """ACTIVATE: bind the guest's key to an ASID (FW `mcmd_activate_common` order)."""
        self._need_platform(PlatformState.WORKING)
        g = self._guest(handle)
        if not isinstance(asid, int) or not 1 <= asid <= MAX_ASID:
            raise SevError(SevStatus.INVALID_ASID, f"ASID {asid!r} out of range 1..{MAX_ASID}")
        if asid in self._asids:
            raise SevError(SevStatus.ASID_OWNED, f"ASID {asid} is in use")
        if asid in self._asids_unflushed:
            raise SevError(SevStatus.DF_FLUSH_REQUIRED, f"ASID {asid} was deactivated and not flushed since")
        if g.active:
            raise SevError(SevStatus.ACTIVE, f"guest {handle} is already active")
        g.asid = asid
        g.active = True
        self._asids[asid] = handle
        self._changed.add(handle)

    @_command()
    def deactivate(self, handle: int) -> None:
        """DEACTIVATE: unbind the ASID (no-op for an inactive guest)."""
        self._need_platform(PlatformState.WORKING)
        g = self._guest(handle)
        if g.active:
            self._asids.pop(g.asid, None)
            self._asids_unflushed.add(g.asid)
            self._wbinvd_needed = True
            self._flush_changed = True
            self._changed.add(handle)
        g.active = False
        g.asid = 0

    def wbinvd(self) -> None:
        """Emulation extra: the host executed WBINVD on every core (what DF_FLUSH requires)."""
        if self._wbinvd_needed:
            self._flush_changed = True
        self._wbinvd_needed = False

    @_command()
    def df_flush(self) -> None:
        """DF_FLUSH: flush the data fabric's write buffers; every deactivated ASID may be ACTIVATEd again."""
        self._need_platform(PlatformState.INIT, PlatformState.WORKING)
        if self._wbinvd_needed:
            raise SevError(SevStatus.WBINVD_REQUIRED, "WBINVD on all cores is required before DF_FLUSH")
        self._asids_unflushed.clear()
        self.df_flush_count += 1
        self._flush_changed = True

    @_command()
    def decommission(self, handle: int) -> None:
        """DECOMMISSION from any live state (incl. SENT); the guest must be deactivated (ACTIVE)."""
        self._need_platform(PlatformState.WORKING)
        g = self._guest(handle)
        if g.active:
            raise SevError(SevStatus.ACTIVE, f"guest {handle} is still active: DEACTIVATE first")
        g.channel = None
        del self._guests[handle]
        self._changed.add(handle)
        if not self._guests:
            self._state = PlatformState.INIT

    @_command()
    def guest_status(self, handle: int) -> GuestStatus:
        self._need_platform(PlatformState.WORKING)
        g = self._guest(handle)
        return GuestStatus(policy=g.policy, asid=g.asid, state=g.state)

    def map_guest_memory(self, handle: int, ram, vmsa=None) -> None:
        """Emulation of the ASID/C-bit wiring: guest-physical address = offset in `ram`; `vmsa` is the
        list of per-vCPU VMSA pages of an SEV-ES guest (one bytearray = a 1-vCPU guest)."""
        g = self._guest(handle)
        if len(ram) % PAGE_SIZE:
            raise SevError(SevStatus.INVALID_PARAM, "guest memory must be a whole number of 4 KiB pages")
        pages = None
        if vmsa is not None:
            pages = [vmsa] if isinstance(vmsa, (bytearray, memoryview)) else list(vmsa)
            if not 1 <= len(pages) <= MAX_VMSAS or any(len(p) != VMSA_SIZE for p in pages):
                raise SevError(SevStatus.INVALID_PARAM, f"1..{MAX_VMSAS} VMSA pages of 4096 bytes each")
        g.ram = ram
        g.vmsa = pages

    def memory_engine(self, handle: int) -> MemoryEngine:
        """GUEST SIDE ONLY: the CPU's view of this guest's memory with the C-bit set."""
        return self._guest(handle).engine

    def launch_digest(self, handle: int) -> bytes:
        """Emulation extra: the SHA-256 launch digest (final after LAUNCH_MEASURE, running before)."""
        g = self._guest(handle)
        return g.final_digest if g.final_digest is not None else hashlib.sha256(g.measured).digest()

    # ------------------------------------------------------------------------------------------------
    # persistence (emulation extras: the PSP's state outlives the host software driving it)
    # ------------------------------------------------------------------------------------------------
    def _key(self) -> bytes:
        if self._sealing_key is None:
            self._sealing_key = seal.check_key(self._rand(seal.SEALING_KEY_SIZE))
        return self._sealing_key

    @property
    def changes_pending(self) -> bool:
        """A command changed a guest context or the ASID flush state since the last `take_changes()`."""
        return bool(self._changed) or self._flush_changed

    def take_changes(self) -> tuple[frozenset[int], bool]:
        """(handles whose context changed, whether the ASID flush state changed) since the last call;
        resets both. A handle no longer live was decommissioned (or the platform shut down)."""
        handles, flush = frozenset(self._changed), self._flush_changed
        self._changed.clear()
        self._flush_changed = False
        return handles, flush

    def has_guest(self, handle: int) -> bool:
        return handle in self._guests

    @property
    def handles(self) -> tuple[int, ...]:
        """The live guest handles, ascending."""
        return tuple(sorted(self._guests))

    def export_guest(self, handle: int) -> bytes:
        """The guest context `handle`, sealed (Kind.GUEST_CONTEXT, bound to the handle): state, policy,
        ASID binding, VEK, the measurement so far (LUPDATE) or the final digest and MEASURE, and the
        TEK/TIK of an open LAUNCH/SEND/RECEIVE channel. Not the memory mapping (`map_guest_memory` again
        after `import_guest`). Platform WORKING, a live handle (INVALID_GUEST)."""
        self._need_platform(PlatformState.WORKING)
        g = self._guest(handle)
        ch = g.channel
        body = {
            "handle": g.handle, "policy": g.policy, "state": int(g.state), "asid": g.asid, "active": g.active,
            "vek": g.vek, "tek": None if ch is None else ch.tek, "tik": None if ch is None else ch.tik,
            "measured": bytes(g.measured), "final_digest": g.final_digest, "measure": g.measure,
        }
        return seal.seal(self._key(), seal.Kind.GUEST_CONTEXT, msgpack.packb(body), self._rng,
                         binding=struct.pack("<H", g.handle))

    def import_guest(self, blob: bytes) -> int:
        """Re-create a guest context from `export_guest`'s blob (sealed under this PSP's sealing key) with
        its handle, state, keys and ASID binding; returns the handle. Platform INIT or WORKING (then
        WORKING). SealError (a SevError) for a damaged or foreign blob and for one that conflicts with the
        firmware's state: its handle is live (INVALID_GUEST), its ASID is bound to another guest
        (ASID_OWNED) or awaits a DF_FLUSH (DF_FLUSH_REQUIRED)."""
        self._need_platform(PlatformState.INIT, PlatformState.WORKING)
        _binding, plain = seal.open_blob(self._key(), blob, seal.Kind.GUEST_CONTEXT)
        c = _decode_context(plain)
        if struct.pack("<H", c["handle"]) != _binding:
            raise seal.SealError(SevStatus.SECURE_DATA_INVALID, "damaged", "handle does not match its binding")
        handle, asid = c["handle"], c["asid"]
        if handle in self._guests:
            raise seal.SealError(SevStatus.INVALID_GUEST, "conflict", f"handle {handle} is in use")
        if c["active"]:
            if asid in self._asids:
                raise seal.SealError(SevStatus.ASID_OWNED, "conflict", f"ASID {asid} is bound to another guest")
            if asid in self._asids_unflushed:
                raise seal.SealError(SevStatus.DF_FLUSH_REQUIRED, "conflict", f"ASID {asid} awaits a DF_FLUSH")
        if c["policy"] & Policy.ES and not self.es_initialized:
            raise SevError(SevStatus.UNSUPPORTED, "SEV-ES guest on a platform without SEV-ES")
        g = _Guest(handle, c["policy"], c["vek"], MemoryEngine(c["vek"]))
        g.state = GuestState(c["state"])
        g.asid, g.active = asid, c["active"]
        if c["tek"] is not None:
            g.channel = crypto.TransportKeys(c["tek"], c["tik"])
        g.measured = bytearray(c["measured"])
        g.final_digest, g.measure = c["final_digest"], c["measure"]
        self._guests[handle] = g
        if g.active:
            self._asids[asid] = handle
        self._state = PlatformState.WORKING
        return handle

    def key_slot(self, handle: int) -> bytes:
        """The guest's VEK as the CPU's memory controller holds it: sealed (Kind.KEY_SLOT) and bound to the
        handle and the ASID it is ACTIVATEd on, for the VMM process to open (`sevmigd.psp.keyslot`). Host
        code passes the blob on and never opens it. A live, activated guest (INVALID_GUEST, INACTIVE)."""
        self._need_platform(PlatformState.WORKING)
        g = self._guest(handle)
        self._need_active(g)
        return seal.seal(self._key(), seal.Kind.KEY_SLOT, g.vek, self._rng,
                         binding=key_slot_binding(g.handle, g.asid))

    def export_flush_state(self) -> bytes:
        """The ASID flush state, sealed (Kind.FLUSH_STATE): the ASIDs DEACTIVATEd since the last DF_FLUSH,
        whether a WBINVD is due, the flush count."""
        body = {"unflushed": sorted(self._asids_unflushed), "wbinvd": self._wbinvd_needed,
                "df_flush_count": self.df_flush_count}
        return seal.seal(self._key(), seal.Kind.FLUSH_STATE, msgpack.packb(body), self._rng)

    def import_flush_state(self, blob: bytes) -> None:
        """Restore `export_flush_state()`'s blob (before `import_guest`: an ACTIVATE waits for its flush
        across a restart). SealError for a damaged or foreign blob, or an ASID bound to a live guest."""
        _b, plain = seal.open_blob(self._key(), blob, seal.Kind.FLUSH_STATE)
        try:
            body = msgpack.unpackb(plain)
            unflushed = body["unflushed"]
            wbinvd, count = body["wbinvd"], body["df_flush_count"]
            ok = (isinstance(unflushed, list) and all(_is_int(a) and 1 <= a <= MAX_ASID for a in unflushed)
                  and isinstance(wbinvd, bool) and _is_int(count) and count >= 0)
        except Exception:
            ok = False
        if not ok:
            raise seal.SealError(SevStatus.SECURE_DATA_INVALID, "damaged", "not an ASID flush state")
        if any(a in self._asids for a in unflushed):
            raise seal.SealError(SevStatus.ASID_OWNED, "conflict", "an unflushed ASID is bound to a live guest")
        self._asids_unflushed.update(unflushed)
        self._wbinvd_needed = self._wbinvd_needed or wbinvd
        self.df_flush_count = max(self.df_flush_count, count)

    @property
    def asids_awaiting_flush(self) -> frozenset[int]:
        """ASIDs DEACTIVATEd since the last DF_FLUSH (an ACTIVATE on one fails with DF_FLUSH_REQUIRED)."""
        return frozenset(self._asids_unflushed)

    # ------------------------------------------------------------------------------------------------
    # launch
    # ------------------------------------------------------------------------------------------------
    @_command()
    def launch_start(self, *, policy: int, handle: int = 0, dh_cert: bytes | None = None,
                     session: bytes | None = None) -> int:
        """LAUNCH_START → new handle. With `dh_cert` (GODH) the channel is opened as server."""
        self._need_platform(PlatformState.INIT, PlatformState.WORKING)
        self._check_u32("policy", policy)
        channel = None
        if dh_cert is not None:
            if session is None or len(session) != SESSION_LEN:
                raise SevError(SevStatus.INVALID_LENGTH, "session must be 0x80 bytes")
            if len(dh_cert) != PDH_CERT_LEN:
                raise SevError(SevStatus.INVALID_LENGTH, "GODH certificate must be 0x824 bytes")
            channel = self._open_server_channel(dh_cert, session, policy)
        self._check_policy(policy)
        g = self._new_guest(policy, handle)
        g.channel = channel if channel is not None else crypto.TransportKeys(bytes(16), bytes(16))
        g.state = GuestState.LUPDATE
        self._guests[g.handle] = g
        self._changed.add(g.handle)
        self._state = PlatformState.WORKING
        return g.handle

    @_command()
    def launch_update_data(self, handle: int, paddr: int, length: int) -> None:
        """Hash plaintext ram[paddr:paddr+length] into the launch digest, then encrypt it in place."""
        self._need_platform(PlatformState.WORKING)
        g = self._guest(handle)
        self._need_state(g, GuestState.LUPDATE)
        self._need_active(g)
        if paddr % 16:
            raise SevError(SevStatus.INVALID_ADDRESS, "paddr must be 16-byte aligned")
        if length <= 0 or length % 16:
            raise SevError(SevStatus.INVALID_LENGTH, "length must be a non-zero multiple of 16")
        self._need_ram(g, paddr, length)
        plain = bytes(memoryview(g.ram)[paddr:paddr + length])
        g.measured += plain
        self._changed.add(handle)
        g.engine.write(g.ram, paddr, plain)

    @_command()
    def launch_update_vmsa(self, handle: int, vcpu: int = 0) -> None:
        """ES only: hash vCPU `vcpu`'s VMSA plaintext into the digest, encrypt it in place (KVM issues
        it once per vCPU, in vCPU order, so the digest covers every save area)."""
        self._need_platform(PlatformState.WORKING)
        g = self._guest(handle)
        self._need_state(g, GuestState.LUPDATE)
        self._need_active(g)
        self._need_es(g)
        page = self._need_vmsa(g, vcpu)
        plain = bytes(page)
        g.measured += plain
        self._changed.add(handle)
        page[:] = g.engine.encrypt(vmsa_paddr(vcpu), plain)

    @_command()
    def launch_measure(self, handle: int, *, measure_len: int = MEASURE_LEN) -> tuple[bytes, bytes]:
        """LAUNCH_MEASURE → (MEASURE 32, MNONCE 16); LUPDATE → LSECRET."""
        self._need_platform(PlatformState.WORKING)
        g = self._guest(handle)
        self._need_state(g, GuestState.LUPDATE)
        if measure_len < MEASURE_LEN:
            raise SevError(SevStatus.INVALID_LENGTH, "measurement buffer too small", measure_len=MEASURE_LEN)
        digest = hashlib.sha256(g.measured).digest()
        mnonce = self._rand(16)
        measure = crypto.launch_measure(g.channel.tik, api_major=self.api_major, api_minor=self.api_minor,
                                        build=self.build, policy=g.policy, digest=digest, mnonce=mnonce)
        g.final_digest = digest
        g.measure = measure
        g.measured = bytearray()
        g.state = GuestState.LSECRET
        self._changed.add(handle)
        return measure, mnonce

    @_command()
    def launch_secret(self, handle: int, hdr: bytes, guest_paddr: int, trans: bytes) -> None:
        """LAUNCH_SECRET: verify (ctx 0x01, MEASURE appended), decrypt with TEK, write under the VEK."""
        self._need_platform(PlatformState.WORKING)
        g = self._guest(handle)
        self._need_state(g, GuestState.LSECRET)
        self._need_active(g)
        if guest_paddr % 16:
            raise SevError(SevStatus.INVALID_ADDRESS, "guest_paddr must be 16-byte aligned")
        n = len(trans)
        if len(hdr) != HDR_LEN or n == 0 or n % 16 or n > MAX_PACKET:
            raise SevError(SevStatus.INVALID_LENGTH, "bad header or secret length")
        self._need_ram(g, guest_paddr, n)
        hdr, trans = bytes(hdr), bytes(trans)
        if not g.channel.verify(hdr, trans, ctx=crypto.CTX_LAUNCH_SECRET, measure=g.measure):
            raise SevError(SevStatus.BAD_MEASUREMENT, "LAUNCH_SECRET MAC does not verify")
        flags, iv, _mac = crypto.parse_header(hdr)
        if flags & crypto.FLAG_COMPRESSED:
            raise SevError(SevStatus.UNSUPPORTED, "compressed packets are not supported")
        plain = g.channel.ctr(iv, trans)
        g.engine.write(g.ram, guest_paddr, plain)

    @_command()
    def launch_finish(self, handle: int) -> None:
        """LAUNCH_FINISH: erase TEK/TIK; LSECRET → RUNNING."""
        self._close_channel(handle, GuestState.LSECRET, GuestState.RUNNING)

    # ------------------------------------------------------------------------------------------------
    # send
    # ------------------------------------------------------------------------------------------------
    @_command()
    def send_start(self, handle: int, *, pdh_cert: bytes, plat_certs: bytes, amd_certs: bytes,
                   session_len: int = SESSION_LEN) -> tuple[int, bytes]:
        """SEND_START → (policy, session 0x80). This platform's PDH is the client key (§3.3)."""
        self._need_platform(PlatformState.WORKING)
        g = self._guest(handle)
        if session_len != SESSION_LEN:
            raise SevError(SevStatus.INVALID_LENGTH, "session buffer must be 0x80 bytes", session_len=SESSION_LEN)
        self._need_state(g, GuestState.RUNNING)
        policy = g.policy
        if policy & Policy.NOSEND:
            raise SevError(SevStatus.POLICY_FAILURE, "policy forbids sending this guest (NOSEND)")
        pdh_cert, plat_certs, amd_certs = bytes(pdh_cert), bytes(plat_certs), bytes(amd_certs)
        if policy & Policy.SEV:
            ident = self.identity
            chain.validate_platform(amd_certs, plat_certs, pdh_cert, root_key_id=ident.ark.key_id,
                                    root_key_hash=chain.ark_key_hash(ident.ark))
            pek = SevCert.decode(chain.split_plat_certs(plat_certs)[0])
            if (pek.api_major, pek.api_minor) < policy_api(policy):
                raise SevError(SevStatus.POLICY_FAILURE, "target firmware API is older than the policy requires")
        if policy & Policy.DOMAIN:
            chain.validate_domain(plat_certs, pdh_cert, local_oca=self.identity.oca.encode())
        if not policy & (Policy.SEV | Policy.DOMAIN) and len(pdh_cert) != PDH_CERT_LEN:
            raise SevError(SevStatus.INVALID_LENGTH, "PDH certificate must be 0x824 bytes")
        peer = chain.pdh_sanity_check(pdh_cert)
        z = crypto.ecdh_z(self.identity.pdh_private, peer)
        tek, tik = self._rand(16), self._rand(16)
        nonce, wrap_iv = self._rand(16), self._rand(16)
        session = crypto.build_session(z, tek=tek, tik=tik, nonce=nonce, wrap_iv=wrap_iv, policy=policy)
        g.channel = crypto.TransportKeys(tek, tik)
        g.state = GuestState.SUPDATE
        self._changed.add(handle)
        return policy, session

    def _send_checks(self, handle: int, hdr_len: int, vmsa: bool) -> _Guest:
        self._need_platform(PlatformState.WORKING)
        if hdr_len < HDR_LEN:
            raise SevError(SevStatus.INVALID_LENGTH, "header buffer too small", hdr_len=HDR_LEN)
        g = self._guest(handle)
        self._need_state(g, GuestState.SUPDATE)
        if vmsa:
            self._need_es(g)
        self._need_active(g)
        return g

    @_command()
    def send_update_data(self, handle: int, guest_paddr: int, guest_len: int, *, hdr_len: int = HDR_LEN,
                         trans_len: int | None = None) -> tuple[bytes, bytes]:
        """SEND_UPDATE_DATA → (header 0x34, ciphertext guest_len)."""
        g = self._send_checks(handle, hdr_len, vmsa=False)
        if trans_len is None:
            trans_len = guest_len
        if guest_len <= 0 or guest_len > MAX_PACKET or guest_len % 16 or trans_len < guest_len:
            raise SevError(SevStatus.INVALID_LENGTH, "bad guest_len / trans_len")
        if guest_paddr % 16:
            raise SevError(SevStatus.INVALID_ADDRESS, "guest_paddr must be 16-byte aligned")
        self._need_ram(g, guest_paddr, guest_len)
        plain = g.engine.read(g.ram, guest_paddr, guest_len)
        return g.channel.seal(self._rand(16), plain, ctx=crypto.CTX_UPDATE)

    @_command(_batch_pages)
    def send_update_data_batch(self, handle: int, pfns: Sequence[int]) -> tuple[bytes, bytes]:
        """N whole pages at pfn*4096 → (N headers, N*4096 ciphertext), same bytes as N single commands.

        Per-packet checks (page inside guest memory) run for all pages before any output is made; the
        first failure raises SevError(INVALID_ADDRESS) with `.index` = its packet number.
        """
        g = self._send_checks(handle, HDR_LEN, vmsa=False)
        p = np.asarray(pfns, dtype=np.int64).ravel() if len(pfns) else np.zeros(0, dtype=np.int64)
        if not p.size:
            return b"", b""
        npages = 0 if g.ram is None else len(g.ram) // PAGE_SIZE
        bad = np.flatnonzero((p < 0) | (p >= npages))
        if bad.size:
            err = SevError(SevStatus.INVALID_ADDRESS, f"page {int(p[bad[0]])} is outside the guest's memory")
            err.index = int(bad[0])
            raise err
        rng = self._rng
        if rng is os.urandom:
            # One read of the OS RNG for all IVs: the same stream N commands would draw (urandom has no
            # per-call state), 16 calls' worth of syscalls fewer per 16 pages.
            ivs = rng(16 * p.size)
        else:
            # One fresh IV per packet, exactly as N commands would draw them (seeded RNGs in tests
            # give the same bytes batch or single).
            ivs = b"".join([rng(16) for _ in range(p.size)])
        if len(ivs) != 16 * p.size:
            raise SevError(SevStatus.HWERROR_PLATFORM, "RNG returned the wrong number of bytes")
        if self.accel:
            tek, tik = g.channel.tek, g.channel.tik
            return psp_accel.send_pages(g.vek, tek, tik, crypto.CTX_UPDATE, g.ram, p, ivs, self.workers)
        # Decrypt under the VEK straight into the output buffer, then AES-CTR it there in place.
        out = crypto._uninit(p.size * PAGE_SIZE)
        g.engine.read_pages_into(g.ram, p, out)
        return g.channel.seal_batch(ivs, out, PAGE_SIZE, ctx=crypto.CTX_UPDATE, in_place=True)

    @_command()
    def send_update_vmsa(self, handle: int, vcpu: int = 0, *, guest_len: int = VMSA_SIZE, hdr_len: int = HDR_LEN,
                         trans_len: int | None = None) -> tuple[bytes, bytes]:
        """ES only: validate vCPU `vcpu`'s VMSA, then export it as one packet (ctx 0x02, like the firmware)."""
        g = self._send_checks(handle, hdr_len, vmsa=True)
        if trans_len is None:
            trans_len = guest_len
        if guest_len != VMSA_SIZE or trans_len < guest_len:
            raise SevError(SevStatus.INVALID_LENGTH, "a VMSA is exactly 4096 bytes")
        page = self._need_vmsa(g, vcpu)
        plain = g.engine.decrypt(vmsa_paddr(vcpu), bytes(page))
        if not vmsa_is_valid(plain):
            raise SevError(SevStatus.INVALID_PARAM, "VMSA failed validation (reserved bytes not zero)")
        return g.channel.seal(self._rand(16), plain, ctx=crypto.CTX_UPDATE)

    @_command()
    def send_finish(self, handle: int) -> None:
        """SEND_FINISH: erase the channel; SUPDATE → SENT."""
        self._close_channel(handle, GuestState.SUPDATE, GuestState.SENT)

    @_command()
    def send_cancel(self, handle: int) -> None:
        """SEND_CANCEL: erase the channel; SUPDATE → RUNNING (the guest may run on here)."""
        self._close_channel(handle, GuestState.SUPDATE, GuestState.RUNNING)

    # ------------------------------------------------------------------------------------------------
    # receive
    # ------------------------------------------------------------------------------------------------
    @_command()
    def receive_start(self, *, policy: int, pdh_cert: bytes, session: bytes, handle: int = 0) -> int:
        """RECEIVE_START → new handle: server side with the *sender's* PDH (sanity-checked only)."""
        self._need_platform(PlatformState.INIT, PlatformState.WORKING)
        self._check_u32("policy", policy)
        if len(session) != SESSION_LEN:
            raise SevError(SevStatus.INVALID_LENGTH, "session must be 0x80 bytes")
        if len(pdh_cert) != PDH_CERT_LEN:
            raise SevError(SevStatus.INVALID_LENGTH, "PDH certificate must be 0x824 bytes")
        channel = self._open_server_channel(pdh_cert, session, policy)
        self._check_policy(policy)
        g = self._new_guest(policy, handle)
        g.channel = channel
        g.state = GuestState.RUPDATE
        self._guests[g.handle] = g
        self._changed.add(g.handle)
        self._state = PlatformState.WORKING
        return g.handle

    def _receive_checks(self, handle: int, vmsa: bool) -> _Guest:
        self._need_platform(PlatformState.WORKING)
        g = self._guest(handle)
        self._need_state(g, GuestState.RUPDATE)
        if vmsa:
            self._need_es(g)
        self._need_active(g)
        return g

    @staticmethod
    def _check_packet_lengths(hdr, trans) -> None:
        n = len(trans)
        if n == 0 or n > MAX_PACKET or n % 16 or len(hdr) < HDR_LEN:
            raise SevError(SevStatus.INVALID_LENGTH, "bad header or transport length")

    @_command()
    def receive_update_data(self, handle: int, hdr: bytes, guest_paddr: int, trans: bytes, *,
                            guest_len: int | None = None) -> None:
        """RECEIVE_UPDATE_DATA: verify, decrypt, write under the new VEK at guest_paddr. `guest_len`
        (default: the transport length) must equal the transport length (INVALID_LENGTH)."""
        g = self._receive_checks(handle, vmsa=False)
        self._check_packet_lengths(hdr, trans)
        if guest_len is not None and guest_len != len(trans):
            raise SevError(SevStatus.INVALID_LENGTH, "guest_len must equal trans_len")
        if guest_paddr % 16:
            raise SevError(SevStatus.INVALID_ADDRESS, "guest_paddr must be 16-byte aligned")
        self._need_ram(g, guest_paddr, len(trans))
        hdr, trans = bytes(hdr[:HDR_LEN]), bytes(trans)
        flags, _iv, _mac = crypto.parse_header(hdr)
        if flags & crypto.FLAG_COMPRESSED:
            raise SevError(SevStatus.UNSUPPORTED, "compressed packets are not supported")
        plain = g.channel.open(hdr, trans, ctx=crypto.CTX_UPDATE)
        g.engine.write(g.ram, guest_paddr, plain)

    @_command(_batch_pages)
    def receive_update_data_batch(self, handle: int, pfns: Sequence[int], headers: bytes, ciphertext: bytes) -> None:
        """Apply N page packets in order (same effect as N single commands). On the first failing
        packet, the packets before it are applied and SevError is raised with `.index` set."""
        g = self._receive_checks(handle, vmsa=False)
        p = np.asarray(pfns, dtype=np.int64).ravel() if len(pfns) else np.zeros(0, dtype=np.int64)
        n = p.size
        if len(headers) != n * HDR_LEN or len(ciphertext) != n * PAGE_SIZE:
            raise SevError(SevStatus.INVALID_LENGTH, "headers / ciphertext do not match the page count")
        if n == 0:
            return
        headers, ciphertext = bytes(headers), memoryview(ciphertext).cast("B")
        npages = 0 if g.ram is None else len(g.ram) // PAGE_SIZE
        fail: SevError | None = None
        good = n
        bad = np.flatnonzero((p < 0) | (p >= npages))
        if bad.size:
            good = int(bad[0])
            fail = SevError(SevStatus.INVALID_ADDRESS, f"page {int(p[good])} is outside the guest's memory")
        flags = np.frombuffer(headers, dtype="<u4")[::HDR_LEN // 4][:good]
        comp = np.flatnonzero(flags & crypto.FLAG_COMPRESSED)
        if comp.size:
            good = int(comp[0])
            fail = SevError(SevStatus.UNSUPPORTED, "compressed packets are not supported")
        if self.accel:
            # verify, decrypt and write in one compiled pass; nothing after the first bad MAC is written
            tek, tik = g.channel.tek, g.channel.tik
            ok = psp_accel.receive_pages(g.vek, tek, tik, crypto.CTX_UPDATE, g.ram, p[:good],
                                         headers[:good * HDR_LEN], ciphertext[:good * PAGE_SIZE],
                                         self.workers) if good else 0
            if ok < good:
                good = ok
                fail = SevError(SevStatus.BAD_MEASUREMENT, f"packet {ok} MAC does not verify")
        else:
            ok = g.channel.verify_batch(headers, ciphertext, PAGE_SIZE, ctx=crypto.CTX_UPDATE, stop_at=good)
            if ok < good:
                good = ok
                fail = SevError(SevStatus.BAD_MEASUREMENT, f"packet {ok} MAC does not verify")
            if good:
                plain = g.channel.decrypt_batch(headers, ciphertext, PAGE_SIZE, good)
                g.engine.write_pages(g.ram, p[:good], plain)
        if fail is not None:
            fail.index = good
            raise fail

    @_command()
    def receive_update_vmsa(self, handle: int, hdr: bytes, trans: bytes, vcpu: int = 0) -> None:
        """ES only: verify and decrypt vCPU `vcpu`'s VMSA packet, validate it, store it under the new VEK."""
        g = self._receive_checks(handle, vmsa=True)
        self._check_packet_lengths(hdr, trans)
        if len(trans) != VMSA_SIZE:
            raise SevError(SevStatus.INVALID_LENGTH, "a VMSA is exactly 4096 bytes")
        page = self._need_vmsa(g, vcpu)
        hdr, trans = bytes(hdr[:HDR_LEN]), bytes(trans)
        flags, _iv, _mac = crypto.parse_header(hdr)
        if flags & crypto.FLAG_COMPRESSED:
            raise SevError(SevStatus.UNSUPPORTED, "compressed packets are not supported")
        plain = g.channel.open(hdr, trans, ctx=crypto.CTX_UPDATE)
        if not vmsa_is_valid(plain):
            raise SevError(SevStatus.INVALID_PARAM, "VMSA failed validation (reserved bytes not zero)")
        page[:] = g.engine.encrypt(vmsa_paddr(vcpu), plain)

    @_command()
    def receive_finish(self, handle: int) -> None:
        """RECEIVE_FINISH: erase the channel; RUPDATE → RUNNING (no final MAC: none exists)."""
        self._close_channel(handle, GuestState.RUPDATE, GuestState.RUNNING)

    # ------------------------------------------------------------------------------------------------
    # debug
    # ------------------------------------------------------------------------------------------------
    def _close_channel(self, handle: int, need: GuestState, new_state: GuestState) -> None:
        """The common tail of LAUNCH_FINISH, SEND_FINISH, SEND_CANCEL and RECEIVE_FINISH: platform
        WORKING, the guest in `need`, then TEK/TIK erased and the guest moved to `new_state`."""
        self._need_platform(PlatformState.WORKING)
        g = self._guest(handle)
        self._need_state(g, need)
        g.channel = None
        g.state = new_state
        self._changed.add(handle)

    def _dbg_checks(self, handle: int, paddr: int, length: int) -> _Guest:
        self._need_platform(PlatformState.WORKING)
        g = self._guest(handle)
        if g.policy & Policy.NODBG:
            raise SevError(SevStatus.POLICY_FAILURE, "policy forbids debugging (NODBG)")
        self._need_active(g)
        if paddr % 16:
            raise SevError(SevStatus.INVALID_ADDRESS, "paddr must be 16-byte aligned")
        if length <= 0 or length % 16:
            raise SevError(SevStatus.INVALID_LENGTH, "length must be a non-zero multiple of 16")
        self._need_ram(g, paddr, length)
        return g

    @_command()
    def dbg_decrypt(self, handle: int, paddr: int, length: int) -> bytes:
        """DBG_DECRYPT: plaintext of guest memory (refused with NODBG)."""
        g = self._dbg_checks(handle, paddr, length)
        return g.engine.read(g.ram, paddr, length)

    @_command()
    def dbg_encrypt(self, handle: int, paddr: int, data: bytes) -> None:
        """DBG_ENCRYPT: write plaintext into guest memory under the VEK (refused with NODBG)."""
        g = self._dbg_checks(handle, paddr, len(data))
        g.engine.write(g.ram, paddr, bytes(data))
