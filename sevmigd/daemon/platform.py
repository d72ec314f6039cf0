"""Platform and PSP: the part of `Daemon` that owns the host's SEV platform.

Split out of daemon/server.py by job (issue 17): `PlatformMixin` loads (or on a first start creates) the
platform identity and trusted roots, starts the emulated PSP with its persisted contexts (daemon/pspstate.py),
holds the PSP runner every firmware command goes through and the host's ASID space, builds the mutual-TLS
contexts, opens the replay record, and takes RUNTIME/lock so two daemons never share a runtime directory.

Must never: start a PSP whose persisted contexts it could not restore without saying so, or let a
second daemon into a runtime directory that one is serving.
"""

from __future__ import annotations

import os
import ssl
from typing import TYPE_CHECKING, NamedTuple

from sevmigd import store
from sevmigd.daemon import control, pspstate, replay, tls
from sevmigd.daemon.config import Config, TlsConfig
from sevmigd.daemon.errors import DaemonError, ResourceLimit, StartupError
from sevmigd.daemon.psprunner import PspRunner
from sevmigd.errors import ConfigError, SevmigdError
from sevmigd.kvm.asid import AsidExhausted, AsidSpace, firmware_flush
from sevmigd.kvm.sev import SevDevice
from sevmigd.psp.certs import AmdCert
from sevmigd.psp.firmware import Firmware, PlatformState
from sevmigd.psp.identity import PlatformIdentity
from sevmigd.psp.status import SevError


if TYPE_CHECKING:  # the mixin's self is the Daemon
    from sevmigd.daemon.server import Daemon


class PlatformMixin:
    """The platform side of `Daemon` (see the module docstring)."""

    _runtime_lock: int | None = None   # RUNTIME/lock's descriptor while we serve (its flock)

    @property
    def asids(self) -> AsidSpace:
        """The host's SEV ASIDs as KVM manages them (sevmigd.kvm.asid): SEV-ES below min_sev_asid, SEV
        from it; a freed ASID is reused only after WBINVD + DF_FLUSH on this daemon's PSP."""
        if self._asid_space is None:
            self._asid_space = AsidSpace(firmware_flush(self.fw))
        return self._asid_space

    @property
    def sev_device(self) -> SevDevice:
        """/dev/sev of this host (sevmigd.kvm.sev.SevDevice): PDH_CERT_EXPORT and the platform's chain."""
        return SevDevice(self.fw)

    def allocate_asid(self, es: bool = False) -> int:
        """A free ASID of the SEV-ES or the SEV range (sev_asid_new); ResourceLimit when none is left
        even after a flush."""
        try:
            return self.asids.new(es)
        except AsidExhausted as exc:
            raise ResourceLimit(str(exc)) from None

    def release_asid(self, asid: int | None) -> None:
        """The guest behind `asid` is gone (DEACTIVATEd): the ASID waits for the next flush."""
        self.asids.free(asid)

    @property
    def psp(self) -> PspRunner:
        """The runner of every firmware command (see sevmigd.daemon.psprunner); exists once the platform
        is loaded (serve() does that, or inject `fw`)."""
        if self._psp is None:
            raise DaemonError("the platform is not loaded yet")
        return self._psp

    def _load_platform(self) -> None:
        """Read (or on a first start create) the platform identity and the trusted roots, start the
        firmware. Blocking file I/O and key generation: serve() runs it in a worker thread."""
        state_dir = self.config.state_dir
        if self.identity is None:
            self.identity = _load_or_create_platform(self, state_dir)
        if not self.trusted_roots and not self._roots_injected:
            self.trusted_roots = _read_trusted_roots(self.config)
        if self.fw is None:
            # The PSP's contexts outlive this process (RUNTIME/psp, daemon/pspstate.py): the sealing key of
            # this runtime directory, then every context and the ASID state restored, before guests are
            # re-adopted. An injected Firmware (tests) is not persisted.
            runtime = self.config.runtime_dir
            if runtime:   # its default lives beside the control socket: that directory's modes come first
                control.ensure_control_dir(self.config.control, self.config.control_group)
            key = pspstate.load_or_create_sealing_key(runtime, self.rng) if runtime else None
            self.fw = Firmware(self.identity, rng=self.rng, sealing_key=key,
                               min_command_time=self.config.psp_min_command_time_us / 1e6,
                               workers=self.config.psp_workers)
            self._psp = PspRunner(self.fw)
            if runtime:
                self.psp_store = pspstate.PspStore(runtime, self.fw, self.asids)
        if self._psp is not None:
            self.metrics.watch_psp(self._psp)  # PSP command counts and latencies, by command
        if self.fw.platform_state is PlatformState.UNINIT:
            self.fw.init()
        if self.psp_store is not None and self._psp.store is None:
            self.psp_restored = self.psp_store.restore()
            self._psp.store = self.psp_store

    def _setup_tls(self) -> None:
        """Mutual TLS (the default): make sure this host has its certificate, that it names this platform,
        and build the listener context now so a bad [tls] fails at start. Plaintext only with
        insecure_plaintext, loudly."""
        tls_cfg = self.config.tls
        if not tls_cfg.enabled:
            self.log.warning("insecure_plaintext",
                             note="migration channel without TLS: peers are not authenticated as platforms; "
                                  "outgoing hand-offs end uncertain and need `ctl resolve` (PROTOCOL.md §9.7)")
            return
        if tls_cfg.state_dir_default and not os.path.lexists(tls_cfg.cert):
            self._issue_default_tls()
        tls.check_own_certificate(tls_cfg, self.identity.chip_id)
        self._tls = _build_tls_contexts(tls_cfg)

    def tls_contexts(self) -> TlsContexts | None:
        """The (server, client) contexts of mutual TLS, None with insecure_plaintext. Built once from the
        [tls] files: serve() builds them at start in a worker thread (the files need a restart to change,
        like the [tls] keys); a daemon that does not serve (in-process tests) on first use."""
        if self._tls is None and self.config.tls.enabled:
            self._tls = _build_tls_contexts(self.config.tls)
        return self._tls

    def _open_replay_record(self) -> None:
        """The destination's record of accepted sessions (daemon/replay.py). A damaged one cannot say which
        sessions were accepted: rotate the PDH (PDH_GEN: every session wrapped to the old one becomes
        unopenable, so none can be replayed), persist the new identity, start a fresh record."""
        path = os.path.join(self.config.state_dir, replay.FILE_NAME)
        try:
            self.replay = replay.ReplayRecord.open(path)
            return
        except replay.ReplayRecordError as exc:
            self.log.error("replay_record_damaged", path=path, error=exc.message,
                           action="PDH_GEN, then a fresh record (the damaged file is kept)")
            error = exc
        try:
            self.fw.pdh_gen()
            store.save_platform(self.config.state_dir, self.fw.identity)
            self.identity = self.fw.identity
            rec = replay.ReplayRecord(path)
            kept = rec.reset()
        except (replay.ReplayRecordError, store.StoreError, SevmigdError) as exc:
            raise StartupError(f"replay record {path} is damaged ({error.message}) and could not be replaced: "
                               f"{exc}") from None
        self.replay = rec
        self.log.warning("replay_record_reset", path=path, kept=str(kept) if kept else None,
                         platform_id=self.platform_id)

    def _issue_default_tls(self) -> None:
        """No TLS certificate in the state dir. A self-contained state dir (its own fleet CA in STATE/ca,
        from a first start before TLS was the default) issues one now; otherwise say what to run."""
        from sevmigd import store

        ca_dir = os.path.join(self.config.state_dir, store.SELF_CONTAINED_CA_DIR)
        if not store.ca_exists(ca_dir):
            raise ConfigError("tls.cert", f"{self.config.tls.cert} missing: this host has no TLS certificate "
                                          f"for the migration channel. Issue one from the fleet CA with "
                                          f"`sevmigd platform tls-cert --state-dir {self.config.state_dir} "
                                          f"--ca CA_DIR`, or set insecure_plaintext = true (not recommended)")
        tls_ca = store.load_tls_ca(ca_dir, rng=self.rng)
        store.issue_host_tls(self.config.state_dir, tls_ca, self.identity, rng=self.rng)
        self.log.info("tls_certificate_issued", state_dir=self.config.state_dir,
                      platform=self.identity.chip_id[:16])

    @property
    def platform_id(self) -> str | None:
        return self.identity.platform_id if self.identity is not None else None

    def _lock_runtime_dir(self) -> None:
        """RUNTIME/lock (flock, held while we serve): two daemons never share a runtime directory (its
        VMMs, PSP contexts and migration records). Blocking: serve() runs it in a worker thread."""
        import fcntl

        rdir = self.config.runtime_dir
        control.ensure_control_dir(self.config.control, self.config.control_group)
        missing = []
        d = os.path.abspath(rdir)
        while not os.path.exists(d):
            missing.append(d)
            d = os.path.dirname(d)
        for d in reversed(missing):   # every directory we create is owner-only, like the control socket's
            try:
                os.mkdir(d, 0o700)
            except FileExistsError:
                pass
        path = os.path.join(rdir, "lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            finally:
                os.close(fd)
            raise StartupError(f"another sevmigd daemon is already serving runtime directory {rdir} "
                               f"(pid {holder} holds {path})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._runtime_lock = fd

    def _unlock_runtime_dir(self) -> None:
        fd, self._runtime_lock = self._runtime_lock, None
        if fd is not None:
            os.close(fd)   # closing the descriptor drops the flock


class TlsContexts(NamedTuple):
    server: ssl.SSLContext
    client: ssl.SSLContext


def _build_tls_contexts(tls_cfg: TlsConfig) -> TlsContexts:
    """Both TLS contexts of this host (reads the key and certificate files)."""
    server, client = tls.server_context(tls_cfg), tls.client_context(tls_cfg)
    assert server is not None and client is not None  # TLS is enabled: tls_settings gave paths
    return TlsContexts(server, client)


def _read_trusted_roots(config: Config) -> list[AmdCert]:
    """ARK certificates a daemon with `config` trusts: the trusted_roots files, else the state dir's."""
    if config.trusted_roots is None:
        return list(store.load_trusted_roots(config.state_dir))
    roots = []
    for i, path in enumerate(config.trusted_roots):
        key = f"trusted_roots[{i}]"
        try:
            data = store.read_regular_file(path)  # non-blocking open: a FIFO is an error, not a stuck thread
        except store.StoreError as exc:
            raise ConfigError(key, f"cannot read {exc}") from None
        try:
            roots.append(AmdCert.decode(data))
        except SevError as exc:
            raise ConfigError(key, f"{path} is not an AMD ARK certificate: {exc}") from None
    return roots


def _load_or_create_platform(daemon: Daemon, state_dir: str) -> PlatformIdentity:
    """store.load_platform(state_dir); on a first start (no identity there yet) create a fresh
    self-contained fleet CA + platform in the state dir and say so in the log."""
    if store.platform_exists(state_dir):
        return store.load_platform(state_dir)
    daemon.log.warning("platform_created", state_dir=state_dir,
                       note="no platform identity found: created a new self-contained fleet CA and "
                            "platform (use `sevmigd platform init` to join an existing fleet)")
    daemon.platform_created = True
    return store.init_self_contained(state_dir, rng=daemon.rng)


__all__ = ["PlatformMixin", "TlsContexts"]
