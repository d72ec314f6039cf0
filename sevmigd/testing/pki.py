"""State dirs for test and demo daemons: platform identity, trusted roots and the TLS identity in one call.

The launcher (sevmigd.testing.daemons, used by the tests, `make faults` and the benchmark) and `make demo`
keep their fleet CAs in memory; `provision()` writes what `sevmigd platform init` would write from a CA directory:
the platform, its fleet's ARK trusted, and STATE_DIR/tls (a host certificate naming the platform's chip,
issued by the fleet's TLS CA, plus the TLS CAs of every trusted fleet so that their hosts can connect).

Must never: hold a CA outside the process (the TLS CA of a fleet is made once per FleetCA, in memory).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable

from sevmigd import store
from sevmigd.psp.identity import FleetCA, PlatformIdentity
from sevmigd.tlsca import TlsCA, cert_pem

_tls_cas: dict[bytes, TlsCA] = {}
_lock = threading.Lock()


def tls_ca_for(ca: FleetCA) -> TlsCA:
    """The TLS CA paired with fleet CA `ca` (one per ARK key id per process)."""
    with _lock:
        if ca.ark.key_id not in _tls_cas:
            _tls_cas[ca.ark.key_id] = TlsCA.create(os.urandom)
        return _tls_cas[ca.ark.key_id]


def provision(state_dir: os.PathLike | str, ca: FleetCA, *, trust: Iterable[FleetCA] = (),
              identity: PlatformIdentity | None = None) -> PlatformIdentity:
    """Platform of fleet `ca` in `state_dir`, trusting `ca` and every fleet in `trust` (ARK and TLS CA)."""
    identity = identity or PlatformIdentity.create(ca, os.urandom)
    store.save_platform(state_dir, identity, trusted_ark=ca.ark)
    extra = []
    for other in trust:
        if other.ark.key_id != ca.ark.key_id:
            store.save_trusted_root(state_dir, other.ark)
            extra.append(cert_pem(tls_ca_for(other).cert))
    store.issue_host_tls(state_dir, tls_ca_for(ca), identity, extra_cas=extra)
    return identity


__all__ = ["provision", "tls_ca_for"]
