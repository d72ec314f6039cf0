"""On-disk storage of the fleet CA, the platform identity and the trusted roots.

Owns the file I/O the pure `sevmigd.psp.identity` layer leaves out: directory layout, modes (0700
directories, 0600 files), atomic replacement, and turning every missing/corrupt/too-open file into
a `StoreError` that names the file.

Must never: log, print or put into an exception message any private key bytes; leave a half-written
identity behind (a crash keeps either the old or the new identity, never a mix); read a private key
that other users could read or replace.

Layout::

    CA_DIR/                 ark.cert ask.cert ark.key ask.key             (FleetCA.to_files)
    STATE_DIR/platform  ->  platform-<id>-<rand>/   (symlink, swapped atomically on every save)
    STATE_DIR/platform-<id>-<rand>/  ark.cert ask.cert cek.cert oca.cert pek.cert pdh.cert
                                     cek.key oca.key pek.key pdh.key      (PlatformIdentity.to_files;
                                     no oca.key once owned externally: PEK_CERT_IMPORT)
    OCA_DIR/                oca.cert oca.key                              (FleetOwner.to_files)
    STATE_DIR/trusted/<ark key id hex>.cert                               (trusted ARKs)
    STATE_DIR/ca/           a self-contained fleet CA (init_self_contained only)
    CA_DIR/                 tls-ca.crt tls-ca.key                        (tlsca.TlsCA, created on demand)
    STATE_DIR/tls/          cert.pem key.pem ca.pem   this host's migration-channel TLS identity, issued
                                                      from the fleet TLS CA; names the platform's chip

A platform identity is a set of ten files that must stay consistent (the PEK is signed by the CEK and
OCA, the PDH by the PEK); writing them in place one by one could leave a PEK whose PDH belongs to the
previous PEK after a crash. So each save writes a fresh generation directory, fsyncs it, and swaps the
``platform`` symlink with one rename(2) — the POSIX atomic step.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterable
from pathlib import Path

from sevmigd.errors import SevmigdError
from sevmigd.psp.certs import AmdCert, Usage
from sevmigd.psp.identity import (
    CA_FILES,
    OWNED_PLATFORM_FILES,
    OWNER_FILES,
    PLATFORM_FILES,
    FleetCA,
    FleetOwner,
    IdentityError,
    PlatformIdentity,
)
from sevmigd.psp.status import SevError
from sevmigd.tlsca import TLS_CA_FILES, TlsCA, TlsIdentityError

DIR_MODE = 0o700
FILE_MODE = 0o600
# Exported public certificates are meant to be copied to other hosts: world-readable is fine.
PUBLIC_FILE_MODE = 0o644

# Identity files are certificates (0x824 bytes), AMD certificates (< 8 KiB) and PEM keys (< 4 KiB): a
# larger file is not one of ours, and reading it whole could exhaust memory.
MAX_STORED_FILE_BYTES = 1 << 20

PLATFORM_LINK = "platform"
PLATFORM_GEN_PREFIX = "platform-"
TRUSTED_DIR = "trusted"
SELF_CONTAINED_CA_DIR = "ca"
# This host's TLS identity for the migration channel (the config's [tls] defaults point here).
TLS_DIR = "tls"
TLS_FILES = {"cert": "cert.pem", "key": "key.pem", "ca": "ca.pem"}


class StoreError(SevmigdError):
    """A stored file or directory is missing, unreadable, corrupt or has unsafe permissions."""

    def __init__(self, path: os.PathLike | str, message: str):
        super().__init__(f"{path}: {message}")
        self.path = str(path)
        self.message = message


# ---------------------------------------------------------------------------------------------
# low-level helpers
# ---------------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _ensure_dir(path: Path) -> None:
    """Create `path` (and parents) with mode 0700, or tighten an existing directory we own to 0700."""
    try:
        path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        st = os.lstat(path)
    except OSError as exc:
        raise StoreError(path, f"cannot create directory: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise StoreError(path, "exists and is not a directory")
    if stat.S_IMODE(st.st_mode) != DIR_MODE:
        try:
            os.chmod(path, DIR_MODE)
        except OSError as exc:
            raise StoreError(path, f"cannot set mode 0700: {exc.strerror}") from None


def write_atomic(path: os.PathLike | str, data: bytes, mode: int = FILE_MODE) -> None:
    """Write `data` to `path` via a temporary file in the same directory, fsync, rename, fsync dir."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(6)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
        try:
            os.fchmod(fd, mode)  # umask must not widen or narrow what we mean
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise StoreError(path, f"cannot write: {exc.strerror}") from None


def _check_dir(path: Path, *, private: bool = False) -> None:
    """A directory we read from: never writable by group/other (someone could swap a file or the
    identity symlink); `private` ones (identity generations) also not readable by them.

    The state directory itself is only required to be non-writable by others, not 0700: systemd's
    StateDirectory= re-applies its StateDirectoryMode= (default 0755) on every start, and the keys
    inside are protected by their own 0700 directory and 0600 modes.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise StoreError(path, "directory does not exist") from None
    except OSError as exc:
        raise StoreError(path, f"cannot access: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise StoreError(path, "is not a directory")
    mode = stat.S_IMODE(st.st_mode)
    if mode & (0o077 if private else 0o022):
        raise StoreError(path, f"directory mode is {mode:04o}, must be 0700 (chmod 700 '{path}')")


def read_file(path: os.PathLike | str, *, secret: bool) -> bytes:
    """Read a regular file (no symlink for secrets). Secret files must be 0600-like (no group/other
    bits); any file must not be writable by group/other (someone else could swap a certificate).

    The open is non-blocking and the type is checked on the open descriptor (fstat) before any read: a
    FIFO, a device or a directory in place of an identity file is a StoreError naming it, never a hang
    (opening a FIFO without O_NONBLOCK waits for a writer, uninterruptibly by SIGTERM's handler)."""
    return _read_regular(Path(path), secret=secret, check_modes=True)


def read_regular_file(path: os.PathLike | str) -> bytes:
    """A public input file named by the configuration (a trusted root, an allowed OCA): the same
    non-blocking, regular-files-only, size-capped read as `read_file`, without the mode rules."""
    return _read_regular(Path(path), secret=False, check_modes=False)


def _read_regular(path: Path, *, secret: bool, check_modes: bool) -> bytes:
    try:
        # A private key is never read through a symlink; a public certificate may be (e.g. a trusted
        # root linked into STATE_DIR/trusted/).
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | (os.O_NOFOLLOW if secret else 0))
    except FileNotFoundError:
        raise StoreError(path, "missing") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP and secret:
            raise StoreError(path, "is a symlink; private keys must be regular files") from None
        raise StoreError(path, f"cannot open: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StoreError(path, f"is not a regular file (it is {_file_kind(st.st_mode)})")
        mode = stat.S_IMODE(st.st_mode)
        if check_modes and secret and mode & 0o077:
            raise StoreError(path, f"private key has mode {mode:04o}, must be 0600 (chmod 600 '{path}')")
        if check_modes and mode & 0o022:
            raise StoreError(path, f"mode {mode:04o} lets other users modify it (chmod go-w '{path}')")
        if st.st_size > MAX_STORED_FILE_BYTES:
            raise StoreError(path, f"is {st.st_size} bytes; identity files are at most {MAX_STORED_FILE_BYTES}")
        chunks = []
        total = 0
        while True:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            total += len(chunk)
            if total > MAX_STORED_FILE_BYTES:  # grew while we read it
                raise StoreError(path, f"is larger than {MAX_STORED_FILE_BYTES} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise StoreError(path, f"cannot read: {exc.strerror}") from None
    finally:
        os.close(fd)


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symlink")):
        if test(mode):
            return name
    return "not a regular file"


def _read_set(directory: Path, names: Iterable[str]) -> dict[str, bytes]:
    return {name: read_file(directory / name, secret=name.endswith(".key")) for name in names}


# ---------------------------------------------------------------------------------------------
# fleet CA
# ---------------------------------------------------------------------------------------------


def ca_exists(directory: os.PathLike | str) -> bool:
    d = Path(directory)
    return any((d / name).exists() for name in CA_FILES)


def _save_key_set(d: Path, files: dict[str, bytes], names: Iterable[str], what: str, overwrite: bool) -> None:
    """Write a set of key files (all 0600) into `d` (0700), refusing to replace an existing set."""
    if not overwrite and any((d / name).exists() for name in names):
        raise StoreError(d, f"already holds {what}; refusing to overwrite it")
    _ensure_dir(d)
    for name, data in files.items():
        write_atomic(d / name, data)


def _load_key_set(d: Path, names: tuple[str, ...], from_files: Callable[[dict[str, bytes]], object]):
    _check_dir(d)
    files = _read_set(d, names)
    try:
        return from_files(files)
    except IdentityError as exc:
        raise StoreError(d / exc.name if exc.name in names else d, exc.message) from None


def save_ca(directory: os.PathLike | str, ca: FleetCA, *, overwrite: bool = False) -> None:
    """Write the fleet CA (certs and private keys, all 0600) into `directory` (0700).

    Refuses to replace an existing CA unless `overwrite`: losing a CA key orphans every platform of
    the fleet.
    """
    _save_key_set(Path(directory), ca.to_files(), CA_FILES, "a fleet CA", overwrite)


def load_ca(directory: os.PathLike | str) -> FleetCA:
    return _load_key_set(Path(directory), CA_FILES, FleetCA.from_files)


# ---------------------------------------------------------------------------------------------
# fleet owner (OCA)
# ---------------------------------------------------------------------------------------------


def save_owner(directory: os.PathLike | str, owner: FleetOwner) -> None:
    """Write a fleet owner's OCA (cert + private key, 0600) into `directory`; never overwrites one:
    losing an OCA key means re-owning every platform of the fleet."""
    _save_key_set(Path(directory), owner.to_files(), OWNER_FILES, "an OCA", False)


def load_owner(directory: os.PathLike | str) -> FleetOwner:
    return _load_key_set(Path(directory), OWNER_FILES, FleetOwner.from_files)


# ---------------------------------------------------------------------------------------------
# platform identity
# ---------------------------------------------------------------------------------------------


def platform_exists(state_dir: os.PathLike | str) -> bool:
    return os.path.lexists(Path(state_dir) / PLATFORM_LINK)


def _platform_dir(state_dir: Path) -> Path:
    link = state_dir / PLATFORM_LINK
    try:
        target = os.readlink(link)
    except FileNotFoundError:
        raise StoreError(
            link, "no platform identity here; create one with `sevmigd platform init --state-dir DIR --ca CA_DIR`"
        ) from None
    except OSError as exc:
        raise StoreError(link, f"is not the identity symlink this store writes ({exc.strerror})") from None
    if "/" in target or not target.startswith(PLATFORM_GEN_PREFIX):
        raise StoreError(link, f"points outside the state directory ({target!r})")
    return state_dir / target


def save_platform(
    state_dir: os.PathLike | str, identity: PlatformIdentity, *, trusted_ark: AmdCert | None = None
) -> None:
    """Atomically replace the platform identity in `state_dir`; optionally add `trusted_ark` to the roots."""
    state = Path(state_dir)
    _ensure_dir(state)
    link = state / PLATFORM_LINK
    if os.path.lexists(link) and not os.path.islink(link):
        raise StoreError(link, "exists and is not the identity symlink this store writes; move it away")
    gen = f"{PLATFORM_GEN_PREFIX}{identity.platform_id[:16]}-{secrets.token_hex(4)}"
    gdir = state / gen
    try:
        os.mkdir(gdir, DIR_MODE)
        os.chmod(gdir, DIR_MODE)
    except OSError as exc:
        raise StoreError(gdir, f"cannot create: {exc.strerror}") from None
    for name, data in identity.to_files().items():
        write_atomic(gdir / name, data)
    _fsync_dir(gdir)
    tmp_link = state / f".{PLATFORM_LINK}.tmp-{secrets.token_hex(6)}"
    try:
        os.symlink(gen, tmp_link)
        os.replace(tmp_link, link)
        _fsync_dir(state)
    except OSError as exc:
        raise StoreError(link, f"cannot switch to the new identity: {exc.strerror}") from None
    for old in state.iterdir():
        if old.name.startswith(PLATFORM_GEN_PREFIX) and old.name != gen and old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
    if trusted_ark is not None:
        save_trusted_root(state, trusted_ark)


def load_platform(state_dir: os.PathLike | str) -> PlatformIdentity:
    state = Path(state_dir)
    _check_dir(state)
    gdir = _platform_dir(state)
    _check_dir(gdir, private=True)
    # An externally owned platform (PEK_CERT_IMPORT) has no oca.key: the fleet owner keeps it.
    names = PLATFORM_FILES if os.path.lexists(gdir / "oca.key") else OWNED_PLATFORM_FILES
    files = _read_set(gdir, names)
    try:
        return PlatformIdentity.from_files(files)
    except IdentityError as exc:
        where = gdir / exc.name if exc.name in PLATFORM_FILES else gdir
        raise StoreError(where, exc.message) from None


def init_self_contained(
    state_dir: os.PathLike | str, *, rng: Callable[[int], bytes] = os.urandom, rsa_bits: int = 4096
) -> PlatformIdentity:
    """First start without configuration: a fleet CA of one in STATE_DIR/ca (with its TLS CA), a platform,
    its ARK trusted, and this host's TLS certificate (STATE_DIR/tls) naming the platform."""
    state = Path(state_dir)
    ca = FleetCA.create(rng, rsa_bits=rsa_bits)
    save_ca(state / SELF_CONTAINED_CA_DIR, ca)
    tls_ca = load_tls_ca(state / SELF_CONTAINED_CA_DIR, rng=rng)
    identity = PlatformIdentity.create(ca, rng)
    save_platform(state, identity, trusted_ark=ca.ark)
    issue_host_tls(state, tls_ca, identity, rng=rng)
    return load_platform(state)


# ---------------------------------------------------------------------------------------------
# TLS identity of the migration channel
# ---------------------------------------------------------------------------------------------


def load_tls_ca(ca_dir: os.PathLike | str, *, rng: Callable[[int], bytes] = os.urandom,
                create: bool = True) -> TlsCA:
    """The fleet TLS CA in `ca_dir` (tls-ca.crt / tls-ca.key). A fleet CA directory made before TLS was
    the default has none: with `create` one is made and saved there (0600) on first use."""
    d = Path(ca_dir)
    _check_dir(d)
    present = [n for n in TLS_CA_FILES if os.path.lexists(d / n)]
    if not present:
        if not create:
            raise StoreError(d / TLS_CA_FILES[0], "missing (run `sevmigd ca init` or `sevmigd platform init`)")
        if not ca_exists(d):
            raise StoreError(d, "holds no fleet CA (create one with `sevmigd ca init DIR`)")
        tls_ca = TlsCA.create(rng)
        for name, data in tls_ca.to_files().items():
            write_atomic(d / name, data)
        return tls_ca
    files = _read_set(d, TLS_CA_FILES)
    try:
        return TlsCA.from_files(files)
    except TlsIdentityError as exc:
        raise StoreError(d / exc.name, exc.message) from None


def tls_paths(state_dir: os.PathLike | str) -> dict[str, str]:
    """{"cert", "key", "ca"} paths of the host TLS identity in `state_dir` (the config's defaults)."""
    d = Path(state_dir) / TLS_DIR
    return {k: str(d / name) for k, name in TLS_FILES.items()}


def issue_host_tls(state_dir: os.PathLike | str, tls_ca: TlsCA, identity: PlatformIdentity, *,
                   rng: Callable[[int], bytes] = os.urandom, extra_cas: Iterable[bytes] = ()) -> dict[str, str]:
    """Issue this host's TLS key + certificate (naming `identity`'s chip) from the fleet TLS CA and write
    them with the CA certificate (plus `extra_cas`, PEM, for peers of other fleets) into STATE_DIR/tls,
    all 0600 in a 0700 directory. The key is written before the certificate that needs it. Returns the
    paths."""
    d = Path(state_dir) / TLS_DIR
    _ensure_dir(Path(state_dir))
    _ensure_dir(d)
    key, cert = tls_ca.issue_host(identity.cek, rng)
    paths = tls_paths(state_dir)
    write_atomic(paths["key"], key)
    write_atomic(paths["cert"], cert)
    write_atomic(paths["ca"], tls_ca.to_files()[TLS_CA_FILES[0]] + b"".join(extra_cas))
    return paths


# ---------------------------------------------------------------------------------------------
# trusted roots
# ---------------------------------------------------------------------------------------------


def _check_ark(path: Path, ark: AmdCert) -> AmdCert:
    if ark.key_usage != Usage.ARK or ark.certifying_id != ark.key_id:
        raise StoreError(path, "is an AMD certificate but not a root (ARK: usage 0, self-certified)")
    return ark


def save_trusted_root(state_dir: os.PathLike | str, ark: AmdCert) -> Path:
    """Add an ARK to STATE_DIR/trusted/ (named by its key id); returns the file written."""
    d = Path(state_dir) / TRUSTED_DIR
    _ensure_dir(d)
    path = d / f"{ark.key_id.hex()}.cert"
    write_atomic(path, _check_ark(path, ark).encode())
    return path


def load_trusted_roots(state_dir: os.PathLike | str) -> list[AmdCert]:
    """Every STATE_DIR/trusted/*.cert, sorted by name; none when the directory does not exist."""
    d = Path(state_dir) / TRUSTED_DIR
    if not d.exists():
        return []
    _check_dir(d)
    roots = []
    for path in sorted(d.glob("*.cert")):
        data = read_file(path, secret=False)
        try:
            roots.append(_check_ark(path, AmdCert.decode(data, allow_unsigned=True)))
        except SevError as exc:
            raise StoreError(path, f"not an AMD ARK certificate: {exc}") from None
    return roots


def load_ark_file(path: os.PathLike | str) -> AmdCert:
    """An ARK certificate a user names (e.g. `--ark FILE`). An unsigned Naples ARK (576 bytes) is
    accepted: pinning it by key id + modulus is what makes it trusted. Public file: any mode that
    does not let others write it."""
    p = Path(path)
    data = read_file(p, secret=False)
    try:
        ark = AmdCert.decode(data, allow_unsigned=True)
    except SevError as exc:
        raise StoreError(p, f"not an AMD ARK certificate: {exc}") from None
    return _check_ark(p, ark)


def export_chain(identity: PlatformIdentity, outdir: os.PathLike | str) -> list[Path]:
    """Write the public chain (sevctl names) into `outdir`, mode 0644; returns the paths written."""
    out = Path(outdir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(out, f"cannot create directory: {exc.strerror}") from None
    written = []
    for name, data in identity.chain_files().items():
        write_atomic(out / name, data, PUBLIC_FILE_MODE)
        written.append(out / name)
    return written
