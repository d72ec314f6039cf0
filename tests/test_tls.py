"""Mutual TLS on the migration channel (sevmigd/daemon/tls.py).

Rules for this file: a throwaway CA and certificates are generated with cryptography.x509 in tmp
dirs (never shipped keys); handshakes are real TLS over loopback TCP on port 0 with trio; every I/O
test runs under fail_after.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import pathlib
import ssl

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sevmigd.daemon import tls
from sevmigd.errors import ConfigError
from sevmigd.tlsca import TlsCA

IO_TIMEOUT = 10


# ------------------------------------------------------------------------------------ throwaway PKI


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sevmigd test"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(cn: str = "sevmigd test fleet CA"):
    """A throwaway TLS CA: (key, certificate), made the way `sevmigd ca init` makes the fleet's."""
    ca = TlsCA.create(os.urandom, name=cn)
    return ca.key, ca.cert


def make_leaf(ca, cn: str, *, expired: bool = False):
    ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    start = now - datetime.timedelta(days=3) if expired else now - datetime.timedelta(minutes=5)
    end = now - datetime.timedelta(days=1) if expired else now + datetime.timedelta(days=1)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(cn),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def _pem_cert(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_tls_files(directory: pathlib.Path, ca, leaf, *, trust=None) -> dict[str, str]:
    """cert.pem / key.pem (0600) / ca.pem in `directory`; `trust` = CA cert to trust (default: ca)."""
    directory.mkdir(parents=True, exist_ok=True)
    key, cert = leaf
    (directory / "cert.pem").write_bytes(_pem_cert(cert))
    fd = os.open(directory / "key.pem", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(_pem_key(key))
    (directory / "ca.pem").write_bytes(_pem_cert((trust or ca)[1]))
    return {"cert": str(directory / "cert.pem"), "key": str(directory / "key.pem"),
            "ca": str(directory / "ca.pem")}


@pytest.fixture(scope="module")
def fleet():
    ca = make_ca()
    return {"ca": ca, "host1": make_leaf(ca, "host1"), "host2": make_leaf(ca, "host2")}


@pytest.fixture
def pki(tmp_path, fleet):
    return {
        "server": write_tls_files(tmp_path / "server", fleet["ca"], fleet["host1"]),
        "client": write_tls_files(tmp_path / "client", fleet["ca"], fleet["host2"]),
    }


# ------------------------------------------------------------------------------ loopback harness


async def _exchange(server_ctx, client_ctx, *, client_sends: bytes = b"hello over tls"):
    """Run one TLS connection over loopback TCP; return (server_outcome, client_outcome).

    Outcomes are ("ok", data, peer_cn) or ("error", TlsError / exception).
    """
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    out = {}

    async def server():
        stream = await listeners[0].accept()
        try:
            s = await tls.wrap_server(stream, server_ctx, timeout=5, peer="client")
        except tls.TlsError as exc:
            out["server"] = ("error", exc)
            return
        try:
            data = await s.receive_some(100)
            await s.send_all(b"ack:" + data)
            out["server"] = ("ok", data, tls.peer_subject(s))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            out["server"] = ("error", exc)
        finally:
            await trio.aclose_forcefully(s)

    async def client():
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        try:
            c = await tls.wrap_client(stream, client_ctx, "127.0.0.1", timeout=5)
        except tls.TlsError as exc:
            out["client"] = ("error", exc)
            return
        try:
            # TLS 1.3: the server judges our certificate after our handshake completes, so a refusal
            # shows up on the first read.
            await c.send_all(client_sends)
            data = await c.receive_some(100)
            if not data:
                raise trio.BrokenResourceError("closed")
            out["client"] = ("ok", data, tls.peer_subject(c))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            out["client"] = ("error", exc)
        finally:
            await trio.aclose_forcefully(c)

    try:
        async with trio.open_nursery() as n:
            n.start_soon(server)
            n.start_soon(client)
    finally:
        for l in listeners:
            await l.aclose()
    return out["server"], out["client"]


# --------------------------------------------------------------------------------------- contexts


def test_tls_off_gives_no_context():
    assert tls.server_context(None) is None
    assert tls.client_context({"cert": None, "key": None, "ca": None}) is None


def test_contexts_require_peer_certs_and_tls12(pki):
    s = tls.server_context(pki["server"])
    c = tls.client_context(pki["client"])
    for ctx in (s, c):
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert c.check_hostname is False
    # Only the configured CA is trusted: the system store is not loaded.
    assert len(s.get_ca_certs()) == 1 and len(c.get_ca_certs()) == 1


def test_context_accepts_object_with_attributes(pki):
    class T:
        cert, key, ca = pki["server"]["cert"], pki["server"]["key"], pki["server"]["ca"]
    assert tls.server_context(T()) is not None


def test_context_accepts_the_daemon_config(pki, tmp_path):
    from sevmigd.daemon.config import load_config
    cfg = load_config(None, {"state_dir": str(tmp_path), "control": str(tmp_path / "c.sock"),
                             "tls": pki["server"]})
    assert tls.server_context(cfg).verify_mode == ssl.CERT_REQUIRED
    assert tls.client_context(cfg) is not None
    assert tls.client_context(load_config(None, {"state_dir": str(tmp_path), "control": "/tmp/x.sock",
                                                 "insecure_plaintext": True})) is None


@pytest.mark.parametrize("missing", ["cert", "key", "ca"])
def test_partial_tls_config_names_the_missing_key(pki, missing):
    cfg = dict(pki["server"])
    cfg[missing] = None
    with pytest.raises(ConfigError) as ei:
        tls.server_context(cfg)
    assert ei.value.key == f"tls.{missing}"


def test_unknown_tls_key_is_refused(pki):
    with pytest.raises(ConfigError) as ei:
        tls.client_context({**pki["client"], "verify": False})
    assert ei.value.key == "tls.verify"


def test_world_readable_key_is_refused(pki):
    os.chmod(pki["server"]["key"], 0o644)
    with pytest.raises(ConfigError) as ei:
        tls.server_context(pki["server"])
    assert ei.value.key == "tls.key" and "0644" in ei.value.message


def test_missing_file_and_garbage_files_are_config_errors(pki, tmp_path):
    with pytest.raises(ConfigError) as ei:
        tls.server_context({**pki["server"], "ca": str(tmp_path / "nope.pem")})
    assert ei.value.key == "tls.ca"
    junk = tmp_path / "junk.pem"
    junk.write_bytes(b"not a certificate\n")
    with pytest.raises(ConfigError) as ei:
        tls.server_context({**pki["server"], "ca": str(junk)})
    assert ei.value.key == "tls.ca"
    with pytest.raises(ConfigError) as ei:
        tls.server_context({**pki["server"], "cert": str(junk)})
    assert ei.value.key in ("tls.cert", "tls.key")


def test_key_not_matching_cert_is_config_error(tmp_path, fleet):
    a = write_tls_files(tmp_path / "a", fleet["ca"], fleet["host1"])
    b = write_tls_files(tmp_path / "b", fleet["ca"], fleet["host2"])
    with pytest.raises(ConfigError):
        tls.server_context({**a, "key": b["key"]})


# ------------------------------------------------------------------------------------ handshakes


async def test_mutual_tls_handshake_succeeds(pki):
    with trio.fail_after(IO_TIMEOUT):
        server, client = await _exchange(tls.server_context(pki["server"]), tls.client_context(pki["client"]))
    assert server == ("ok", b"hello over tls", "host2")
    assert client == ("ok", b"ack:hello over tls", "host1")


async def test_client_without_certificate_is_refused(pki):
    # A client that trusts our CA but presents no certificate of its own.
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    bare.check_hostname = False
    bare.load_verify_locations(cafile=pki["client"]["ca"])
    with trio.fail_after(IO_TIMEOUT):
        server, client = await _exchange(tls.server_context(pki["server"]), bare)
    assert server[0] == "error" and isinstance(server[1], tls.TlsError)
    assert "certificate" in server[1].reason.lower()
    assert client[0] == "error"


async def test_client_from_another_ca_is_refused(tmp_path, fleet):
    other = make_ca("another fleet")
    intruder = write_tls_files(tmp_path / "intruder", other, make_leaf(other, "intruder"), trust=fleet["ca"])
    server_cfg = write_tls_files(tmp_path / "server", fleet["ca"], fleet["host1"])
    with trio.fail_after(IO_TIMEOUT):
        server, client = await _exchange(tls.server_context(server_cfg), tls.client_context(intruder))
    assert server[0] == "error" and isinstance(server[1], tls.TlsError)
    assert "certificate verify failed" in server[1].reason
    assert client[0] == "error"


async def test_server_from_another_ca_is_refused_by_client(tmp_path, fleet):
    other = make_ca("another fleet")
    rogue = write_tls_files(tmp_path / "rogue", other, make_leaf(other, "rogue"), trust=fleet["ca"])
    client_cfg = write_tls_files(tmp_path / "client", fleet["ca"], fleet["host2"])
    with trio.fail_after(IO_TIMEOUT):
        server, client = await _exchange(tls.server_context(rogue), tls.client_context(client_cfg))
    assert client[0] == "error" and isinstance(client[1], tls.TlsError)
    assert "certificate verify failed" in client[1].reason
    assert server[0] == "error"


async def test_expired_peer_certificate_is_refused(tmp_path, fleet):
    old = write_tls_files(tmp_path / "old", fleet["ca"], make_leaf(fleet["ca"], "old", expired=True))
    server_cfg = write_tls_files(tmp_path / "server", fleet["ca"], fleet["host1"])
    with trio.fail_after(IO_TIMEOUT):
        server, client = await _exchange(tls.server_context(server_cfg), tls.client_context(old))
    assert server[0] == "error" and "expired" in server[1].reason


async def test_plaintext_client_is_refused_with_typed_error(pki):
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    ctx = tls.server_context(pki["server"])
    with trio.fail_after(IO_TIMEOUT):
        async with trio.open_nursery() as n:
            async def garbage():
                s = await trio.open_tcp_stream("127.0.0.1", port)
                await s.send_all(b"\x00\x00\x00\x10this is not tls at all")
                await s.aclose()
            n.start_soon(garbage)
            stream = await listeners[0].accept()
            with pytest.raises(tls.TlsError):
                await tls.wrap_server(stream, ctx, timeout=5)
        await listeners[0].aclose()


async def test_silent_peer_times_out(pki):
    """A peer that connects and says nothing is dropped at the handshake deadline (MockClock)."""
    a, b = trio.testing.memory_stream_pair()
    ctx = tls.server_context(pki["server"])
    with trio.fail_after(IO_TIMEOUT):
        with pytest.raises(tls.TlsError) as ei:
            await tls.wrap_server(a, ctx, timeout=0.2)
    assert ei.value.reason == "timed out"
    await b.aclose()


async def test_wrap_client_drops_sni_for_ip_literal(pki):
    """An IP literal is never sent as SNI (RFC 6066); a name is. Checked via the server's SNI callback."""
    seen = []
    server_ctx = tls.server_context(pki["server"])
    server_ctx.sni_callback = lambda sslobj, name, ctx: seen.append(name)
    client_ctx = tls.client_context(pki["client"])
    for host in ("127.0.0.1", "host1.example"):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        with trio.fail_after(IO_TIMEOUT):
            async with trio.open_nursery() as n:
                async def srv():
                    s = await tls.wrap_server(await listeners[0].accept(), server_ctx, timeout=5)
                    await trio.aclose_forcefully(s)
                n.start_soon(srv)
                c = await tls.wrap_client(await trio.open_tcp_stream("127.0.0.1", port), client_ctx, host)
                await trio.aclose_forcefully(c)
        await listeners[0].aclose()
    assert seen == [None, "host1.example"]
