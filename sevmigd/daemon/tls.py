"""Mutual TLS on the migration channel (trio.SSLStream): on by default, off only with insecure_plaintext.

Owns the TLS policy of the daemon-to-daemon channel: which protocol versions, what each side must
present and what it must chain to, and the handshake under a deadline. Nothing else in sevmigd
creates an ssl.SSLContext.

Why TLS at all, when SEV already protects the guest: SEND_UPDATE_DATA packets are encrypted and
MAC'd under the transport keys, and the platform chain (PDH/PEK/OCA/CEK) authenticates the
destination firmware. But shared (unencrypted) pages, vCPU metadata of non-ES guests, guest names and
migration statistics travel in the clear, and without TLS anyone who can reach port 4446 can make the
daemon parse frames. Mutual TLS with a fleet TLS CA keeps the clear parts confidential and means only
fleet members get as far as the Hello.

Identity: every host certificate names the SEV platform it belongs to (a SAN URI
`urn:sevmigd:platform:<chip id>`, sevmigd.tlsca). `peer_platforms()` reads that name from the verified
peer certificate; the migration drivers compare it with the chip whose CEK is in the chain the peer
presents in Hello / Accept, so a fleet member cannot speak for another platform (PROTOCOL.md §9.7).
`check_own_certificate()` refuses to start a daemon whose own certificate names another chip.

Policy (both directions): TLS >= 1.2, certificate REQUIRED from the peer, verified against the
configured CA file only (never the system trust store: a public web CA must not admit a host into
the fleet), our own certificate and key presented. Hostname checking is OFF on the client: daemons
are addressed by IP or by whatever name the operator typed in `ctl migrate --to`, and certificates
are issued per host by the fleet CA, so "issued by our CA" is the identity that matters; the
hostname is still sent as SNI when it is a name. Operators who want per-peer pinning use
`allowed_platforms` or a dedicated CA per trust domain.

This module must never: fall back to plaintext when TLS is configured, load default CA paths,
accept a key file that other users can read, log, or let an ssl exception escape untyped (everything
becomes ConfigError at setup or TlsError at handshake).
"""

from __future__ import annotations

import ipaddress
import os
import ssl
import stat
from collections.abc import Mapping

import trio

from sevmigd.errors import ConfigError, SevmigdError

# Handshake deadline when the caller passes none; matches the config default handshake_timeout_s so
# a silent or trickling peer cannot hold an accept slot longer than an unencrypted Hello would.
HANDSHAKE_TIMEOUT_S = 10.0

# TLS 1.2 is the floor (RFC 8996 deprecates 1.0/1.1); 1.3 is negotiated whenever both sides have it.
MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2

# For TLS 1.2 only: forward-secret AEAD suites. (TLS 1.3 suites are all AEAD + PFS already.)
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"

_KEYS = ("cert", "key", "ca")


class TlsError(SevmigdError):
    """The TLS handshake with a peer failed: `reason` says why, in words an operator can act on."""

    def __init__(self, reason: str, *, peer: str | None = None):
        super().__init__(f"TLS handshake{' with ' + peer if peer else ''} failed: {reason}")
        self.reason = reason
        self.peer = peer


def tls_settings(cfg: object) -> dict[str, str] | None:
    """Normalise the config's `tls` table to {"cert", "key", "ca"} paths, or None when TLS is off.

    Accepts None, a mapping, an object with cert/key/ca attributes (config.TlsConfig), or the whole
    daemon Config (its `tls` is used). All three must be set together: mutual TLS without a CA (or without our own certificate) is not mutual.
    """
    if cfg is None:
        return None
    if not isinstance(cfg, Mapping) and not hasattr(cfg, "cert") and hasattr(cfg, "tls"):
        cfg = cfg.tls  # the whole daemon Config was handed in: use its [tls] table
        if cfg is None:
            return None
    if isinstance(cfg, Mapping):
        values = {k: cfg.get(k) for k in _KEYS}
        unknown = sorted(set(cfg) - set(_KEYS))
        if unknown:
            raise ConfigError(f"tls.{unknown[0]}", "unknown key (expected cert, key, ca)")
    else:
        values = {k: getattr(cfg, k, None) for k in _KEYS}
    if all(v in (None, "") for v in values.values()):
        return None
    for k in _KEYS:
        v = values[k]
        if v in (None, ""):
            raise ConfigError(f"tls.{k}", "missing: tls needs cert, key and ca together (mutual TLS)")
        if not isinstance(v, (str, os.PathLike)):
            raise ConfigError(f"tls.{k}", f"must be a file path, got {type(v).__name__}")
        values[k] = os.fspath(v)
    return values  # type: ignore[return-value]


def _check_files(paths: dict[str, str]) -> None:
    for k in _KEYS:
        try:
            st = os.stat(paths[k])
        except OSError as exc:
            raise ConfigError(f"tls.{k}", f"cannot read {paths[k]}: {exc.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"tls.{k}", f"{paths[k]} is not a regular file")
    mode = stat.S_IMODE(os.stat(paths["key"]).st_mode)
    if mode & 0o007:
        # Like ssh with a private key: refuse rather than run with a key anyone on the host can copy.
        raise ConfigError("tls.key", f"{paths['key']} is accessible by other users (mode {mode:04o}); "
                                     f"chmod 600 it (or 640 with the sevmigd group)")


def _base_context(purpose: int, paths: dict[str, str]) -> ssl.SSLContext:
    _check_files(paths)
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = MINIMUM_VERSION
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_verify_locations(cafile=paths["ca"])
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError("tls.ca", f"{paths['ca']} holds no usable CA certificate ({_reason(exc)})") from None
    try:
        ctx.load_cert_chain(paths["cert"], paths["key"])
    except ssl.SSLError as exc:
        key = "tls.key" if "KEY" in str(exc).upper() else "tls.cert"
        raise ConfigError(key, f"cannot load {paths['cert']} / {paths['key']}: {_reason(exc)}") from None
    except OSError as exc:
        raise ConfigError("tls.cert", f"cannot load certificate/key: {exc.strerror or exc}") from None
    return ctx


def server_context(cfg: object) -> ssl.SSLContext | None:
    """Context for the migration listener: require and verify a client certificate from our CA."""
    paths = tls_settings(cfg)
    if paths is None:
        return None
    return _base_context(ssl.PROTOCOL_TLS_SERVER, paths)


def client_context(cfg: object) -> ssl.SSLContext | None:
    """Context for outgoing migrations: present our certificate, require the peer's to chain to our CA.

    check_hostname is off on purpose (see the module docstring); CERT_REQUIRED stays on.
    """
    paths = tls_settings(cfg)
    if paths is None:
        return None
    ctx = _base_context(ssl.PROTOCOL_TLS_CLIENT, paths)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED  # setting check_hostname never lowers this, but say it
    return ctx


# OpenSSL reason codes an operator meets in practice, in words (the code is kept for searching).
_FRIENDLY = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "peer presented no certificate",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "peer requires a client certificate and we sent none",
    "TLSV1_ALERT_UNKNOWN_CA": "peer does not trust our certificate's CA",
    "SSLV3_ALERT_BAD_CERTIFICATE": "peer rejected our certificate",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "peer says our certificate has expired",
    "WRONG_VERSION_NUMBER": "peer is not speaking TLS (plaintext sevmigd? check [tls] on both hosts)",
    "HTTP_REQUEST": "peer is not speaking TLS (HTTP request)",
    "UNSUPPORTED_PROTOCOL": "peer offers only TLS < 1.2",
    "UNEXPECTED_EOF_WHILE_READING": "peer closed the connection during the handshake",
}


def _reason(exc: BaseException | None) -> str:
    """A short human reason from an ssl exception chain ("certificate verify failed: ...")."""
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, ssl.SSLCertVerificationError):
            return f"certificate verify failed: {exc.verify_message}"
        if isinstance(exc, ssl.SSLError):
            code = exc.reason or ""
            return f"{_FRIENDLY[code]} ({code})" if code in _FRIENDLY else (code or str(exc))
        if not isinstance(exc, (trio.BrokenResourceError, trio.ClosedResourceError)):
            return str(exc) or type(exc).__name__
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return "connection closed during handshake"


async def _handshake(ssl_stream: trio.SSLStream, timeout: float | None, peer: str | None) -> trio.SSLStream:
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT_S if timeout is None else timeout):
            await ssl_stream.do_handshake()
    except trio.TooSlowError:
        await trio.aclose_forcefully(ssl_stream)
        raise TlsError("timed out", peer=peer) from None
    except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError) as exc:
        await trio.aclose_forcefully(ssl_stream)
        raise TlsError(_reason(exc), peer=peer) from None
    return ssl_stream


async def wrap_server(stream: trio.abc.Stream, ctx: ssl.SSLContext, *, timeout: float | None = None,
                      peer: str | None = None) -> trio.SSLStream:
    """Server-side TLS over an accepted stream; returns the SSLStream after a verified handshake.

    On failure (no client certificate, wrong CA, timeout, garbage) the transport is closed and
    TlsError is raised; the caller logs it and drops the connection.
    """
    return await _handshake(trio.SSLStream(stream, ctx, server_side=True), timeout, peer)


async def wrap_client(stream: trio.abc.Stream, ctx: ssl.SSLContext, server_hostname: str | None = None, *,
                      timeout: float | None = None) -> trio.SSLStream:
    """Client-side TLS over a connected stream to a peer daemon (mutual: we present our cert too)."""
    sni = server_hostname
    if sni is not None:
        try:
            ipaddress.ip_address(sni.strip("[]"))
            sni = None  # SNI must not carry an IP literal (RFC 6066 §3)
        except ValueError:
            pass
    return await _handshake(trio.SSLStream(stream, ctx, server_hostname=sni), timeout, server_hostname)


def peer_platforms(stream: object) -> frozenset[str] | None:
    """The chip ids the verified peer certificate names; None when `stream` is not TLS (plaintext).

    An SSLStream whose peer certificate names no platform gives an empty set: authenticated as a fleet
    member, but as no platform, which the drivers refuse like a mismatch.
    """
    if not isinstance(stream, trio.SSLStream):
        return None
    from sevmigd.tlsca import named_platforms

    try:
        der = stream.getpeercert(binary_form=True)
    except (ValueError, ssl.SSLError):
        return frozenset()
    return named_platforms(der) if der else frozenset()


def check_own_certificate(cfg: object, chip: str) -> None:
    """ConfigError unless our configured certificate names `chip` (this host's chip id): a daemon whose
    certificate names another platform would be refused by every peer, so say it at start."""
    paths = tls_settings(cfg)
    if paths is None:
        return
    from cryptography import x509

    from sevmigd.tlsca import PLATFORM_URI_PREFIX, named_platforms

    try:
        with open(paths["cert"], "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
    except OSError as exc:
        raise ConfigError("tls.cert", f"cannot read {paths['cert']}: {exc.strerror}") from None
    except ValueError:
        raise ConfigError("tls.cert", f"{paths['cert']} is not a PEM X.509 certificate") from None
    named = named_platforms(cert)
    if chip not in named:
        what = ", ".join(sorted(c[:16] for c in named)) or "no platform"
        raise ConfigError("tls.cert", f"{paths['cert']} names {what}, not this host's platform {chip[:16]} "
                                      f"(a SAN URI {PLATFORM_URI_PREFIX}{chip} is required); issue one with "
                                      f"`sevmigd platform tls-cert --state-dir DIR --ca CA_DIR`")


def peer_subject(ssl_stream: trio.SSLStream) -> str | None:
    """The verified peer certificate's subject CN (or the whole subject), for logs; None if none."""
    cert = ssl_stream.getpeercert()
    if not cert:
        return None
    rdns = [dict(rdn) for rdn in cert.get("subject", ())]
    for rdn in rdns:
        if "commonName" in rdn:
            return rdn["commonName"]
    return ", ".join(f"{k}={v}" for rdn in rdns for k, v in rdn.items()) or None


__all__ = ["TlsError", "tls_settings", "server_context", "client_context", "wrap_server",
           "wrap_client", "peer_subject", "peer_platforms", "check_own_certificate", "HANDSHAKE_TIMEOUT_S"]
