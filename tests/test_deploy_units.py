"""The shipped deployment files: systemd units (deploy/systemd/) and the example config (deploy/sevmigd.toml).

Rules for this file: systemd's own tools judge the units (`systemd-analyze verify`, `systemd-analyze
security --offline`), skipped with the reason when the tool is missing; the example config is read
by the daemon's real config loader; the MemoryDenyWriteExecute claim is checked by running our stack
under the kernel's equivalent (prctl PR_SET_MDWE), skipped when the kernel lacks it.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import shutil
import signal
import stat
import threading
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
UNITS = ROOT / "deploy" / "systemd"
SERVICE = UNITS / "sevmigd.service"
SOCKET = UNITS / "sevmigd.socket"
EXAMPLE = ROOT / "deploy" / "sevmigd.toml"
SEVMIGD_BIN = pathlib.Path(sys.executable).parent / "sevmigd"

needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze not installed (package systemd)")


def parse_unit(path: pathlib.Path) -> dict[str, list[tuple[str, str]]]:
    """{section: [(key, value), ...]} keeping repeats (systemd allows and accumulates them)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            current = line.strip("[]")
            sections.setdefault(current, [])
            continue
        key, _, value = line.partition("=")
        sections[current].append((key.strip(), value.strip()))
    return sections


def one(section: list[tuple[str, str]], key: str) -> str:
    values = [v for k, v in section if k == key]
    assert values, f"{key}= missing"
    return values[-1]


def _copy_for_verify(tmp_path: pathlib.Path) -> list[pathlib.Path]:
    """Units as shipped, except ExecStart pointing at the venv's sevmigd (verify checks it exists)."""
    if not SEVMIGD_BIN.exists():
        pytest.skip(f"{SEVMIGD_BIN} missing (package not installed in this venv)")
    out = []
    for src in (SERVICE, SOCKET):
        dst = tmp_path / src.name
        dst.write_text(src.read_text().replace("ExecStart=/usr/bin/sevmigd ", f"ExecStart={SEVMIGD_BIN} "))
        out.append(dst)
    return out


# ------------------------------------------------------------------------------ systemd's verdict


@needs_analyze
def test_units_pass_systemd_analyze_verify(tmp_path):
    units = _copy_for_verify(tmp_path)
    proc = subprocess.run(["systemd-analyze", "verify", *map(str, units)], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    # verify exits 0 even for unknown keys or unparsable values ("... ignoring"): any output about
    # our files counts as a failure.
    ours = [l for l in (proc.stdout + proc.stderr).splitlines() if "sevmigd" in l]
    assert proc.returncode == 0 and not ours, proc.stdout + proc.stderr


@needs_analyze
def test_verify_catches_a_broken_unit(tmp_path):
    """The check above can fail: a misspelt key and a bad value are reported."""
    units = _copy_for_verify(tmp_path)
    units[0].write_text(units[0].read_text().replace("ProtectSystem=strict", "ProtectSystem=strictt\nProtectSystm=yes"))
    proc = subprocess.run(["systemd-analyze", "verify", *map(str, units)], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert "ProtectSystm" in out and "strictt" in out


@needs_analyze
def test_security_exposure_is_low(tmp_path):
    units = _copy_for_verify(tmp_path)
    proc = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(units[0])],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    if proc.returncode != 0 and "offline" in proc.stderr:
        pytest.skip("systemd-analyze security --offline needs systemd >= 250")
    m = re.search(r"Overall exposure level for sevmigd\.service: ([0-9.]+)", proc.stdout + proc.stderr)
    assert m, proc.stdout + proc.stderr
    # 0 = fully locked down, 10 = unprotected; "OK" starts below 5. What remains is network access,
    # which a migration daemon needs by definition.
    assert float(m.group(1)) <= 2.0, proc.stdout


# --------------------------------------------------------------------------------- unit contents


def test_service_is_notify_watchdog_restart():
    s = parse_unit(SERVICE)["Service"]
    assert one(s, "Type") == "notify"
    assert one(s, "ExecStart") == "/usr/bin/sevmigd serve --config /etc/sevmigd/sevmigd.toml"
    assert one(s, "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one(s, "Restart") == "on-failure"
    assert one(s, "WatchdogSec").endswith("s")
    assert one(s, "TimeoutStopSec").endswith("s")
    # The daemon's graceful shutdown budget must fit in the stop timeout.
    from sevmigd.daemon import server
    assert int(one(s, "TimeoutStopSec").rstrip("s")) > getattr(server, "SHUTDOWN_MIGRATIONS_S", 0)


def test_service_runs_as_dedicated_user_with_private_dirs():
    s = parse_unit(SERVICE)["Service"]
    assert one(s, "User") == "sevmigd" and one(s, "DynamicUser") == "no"
    assert one(s, "StateDirectory") == "sevmigd" and one(s, "StateDirectoryMode") == "0700"
    assert one(s, "RuntimeDirectory") == "sevmigd"
    assert one(s, "ConfigurationDirectory") == "sevmigd"
    assert one(s, "UMask") == "0077"


def test_guests_outlive_a_service_restart():
    """Issue 17: stop/restart signals only the daemon (its VMM processes run on), systemd keeps the runtime
    directory (VMM sockets, PSP contexts) across restarts, and an OOM kill of one VMM does not stop the
    service."""
    s = parse_unit(SERVICE)["Service"]
    assert one(s, "KillMode") == "process"
    assert one(s, "RuntimeDirectoryPreserve") == "yes"
    assert one(s, "OOMPolicy") == "continue"


@pytest.mark.parametrize("key,value", [
    ("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("ProtectHome", "yes"), ("PrivateTmp", "yes"),
    ("PrivateDevices", "yes"), ("ProtectKernelTunables", "yes"), ("ProtectKernelModules", "yes"),
    ("ProtectControlGroups", "yes"), ("RestrictNamespaces", "yes"), ("LockPersonality", "yes"),
    ("MemoryDenyWriteExecute", "yes"), ("RestrictRealtime", "yes"), ("CapabilityBoundingSet", ""),
    ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"), ("SystemCallArchitectures", "native"),
])
def test_service_hardening(key, value):
    assert one(parse_unit(SERVICE)["Service"], key) == value


def test_service_syscall_filter_is_system_service():
    filters = [v for k, v in parse_unit(SERVICE)["Service"] if k == "SystemCallFilter"]
    assert "@system-service" in filters


def test_socket_passes_port_4446_to_the_service():
    unit = parse_unit(SOCKET)
    s = unit["Socket"]
    assert one(s, "ListenStream") == "4446"
    assert one(s, "Service") == "sevmigd.service"
    assert one(s, "Accept") == "no"
    assert one(unit["Install"], "WantedBy") == "sockets.target"
    svc = parse_unit(SERVICE)["Unit"]
    assert "sevmigd.socket" in one(svc, "After")


# ------------------------------------------------------------------------------ MDWE and our stack


_MDWE_CHILD = textwrap.dedent("""
    import ctypes, mmap, os, sys
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        print("UNSUPPORTED", ctypes.get_errno()); sys.exit(0)
    try:  # prove it is enforced
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        print("NOT ENFORCED"); sys.exit(1)
    except OSError:
        pass
    # Everything the daemon loads and exercises, after W^X is locked in.
    import ssl, msgpack, numpy, structlog, trio
    from cryptography.hazmat.primitives.asymmetric import ec, rsa, padding
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    import sevmigd.cli, sevmigd.daemon.systemd, sevmigd.daemon.tls
    a, b = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    assert a.exchange(ec.ECDH(), b.public_key()) == b.exchange(ec.ECDH(), a.public_key())
    k = rsa.generate_private_key(65537, 2048)
    k.public_key().verify(k.sign(b"m", padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256()),
                          b"m", padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())
    Cipher(algorithms.AES(os.urandom(16)), modes.CTR(os.urandom(16))).encryptor().update(b"x" * 4096)
    assert msgpack.unpackb(msgpack.packb({"a": b"x"})) == {"a": b"x"}
    assert int(numpy.packbits(numpy.ones(64, dtype=bool)).sum()) == 8 * 255
    ssl.create_default_context()
    async def main():
        async def echo(stream):
            await stream.send_all(await stream.receive_some(10))
        async with trio.open_nursery() as n:
            ls = await n.start(trio.serve_tcp, echo, 0)
            port = ls[0].socket.getsockname()[1]
            s = await trio.open_tcp_stream("127.0.0.1", port)
            await s.send_all(b"ok")
            assert await s.receive_some(10) == b"ok"
            n.cancel_scope.cancel()
    trio.run(main)
    print("OK")
""")


def test_memory_deny_write_execute_does_not_break_the_stack():
    proc = subprocess.run([sys.executable, "-c", _MDWE_CHILD], capture_output=True, text=True, timeout=120)
    if proc.stdout.startswith("UNSUPPORTED"):
        pytest.skip(f"kernel lacks PR_SET_MDWE (Linux >= 6.3): {proc.stdout.strip()}")
    assert proc.returncode == 0 and proc.stdout.strip() == "OK", proc.stdout + proc.stderr


# ----------------------------------------------------------------------------------- example config


def _uncommented_example(tmp_path: pathlib.Path) -> pathlib.Path:
    """The example with every `#key = value` and `#[table]` line uncommented."""
    lines = []
    for line in EXAMPLE.read_text().splitlines():
        if re.match(r"^#\s*(\[[a-z_.]+\]|[a-z_]+\s*=)", line):
            line = line.lstrip("#").lstrip()
        lines.append(line)
    out = tmp_path / "sevmigd.toml"
    out.write_text("\n".join(lines) + "\n")
    return out


def test_example_config_loads_as_shipped():
    from sevmigd.daemon.config import Config, load_config
    cfg = load_config(str(EXAMPLE), {}, environ={"STATE_DIRECTORY": "/var/lib/sevmigd",
                                                "RUNTIME_DIRECTORY": "/run/sevmigd"})
    assert isinstance(cfg, Config)


def test_example_config_documents_every_key_with_its_default(tmp_path):
    from sevmigd.daemon.config import KEYS, Config, load_config
    text = EXAMPLE.read_text()
    missing = [k for k in KEYS if not re.search(rf"^#?{k}\s*=", text, re.M) and not re.search(rf"^#?\[{k}[\].]", text, re.M)]
    assert not missing, f"keys not documented in deploy/sevmigd.toml: {missing}"
    env = {"STATE_DIRECTORY": "/var/lib/sevmigd", "RUNTIME_DIRECTORY": "/run/sevmigd"}
    full = load_config(str(_uncommented_example(tmp_path)), {}, environ=env)
    default = load_config(None, {}, environ=env)
    # Keys whose default is "unset" are shown with an example value instead.
    examples = {"control_group", "trusted_roots", "allowed_platforms", "allowed_oca", "tls",
                "metrics_listen", "default_policy", "policies", "max_incoming_bytes"}
    differ = [f.name for f in dataclasses.fields(Config)
              if f.name not in examples and getattr(full, f.name) != getattr(default, f.name)]
    assert not differ, f"example values differ from the defaults for {differ}"
    assert full.tls.cert and full.tls.key and full.tls.ca


# ------------------------------------------------------------- the unit's command line, as systemd runs it


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the daemon as another user")
@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None or shutil.which("setpriv") is None,
                    reason="needs systemd-socket-activate and setpriv (util-linux)")
def test_unit_command_line_runs_as_service_user(tmp_path):
    """ExecStart= as shipped (binary -> the venv's, config -> deploy/sevmigd.toml as shipped), with
    what the units provide: fd 3 from the socket, $STATE_DIRECTORY (0700) and $RUNTIME_DIRECTORY
    owned by the service user, NOTIFY_SOCKET, UMask=0077, an unprivileged uid. The daemon must come
    up READY on the inherited port with its state and control socket where systemd put them."""
    import socket
    import tempfile

    svc = parse_unit(SERVICE)["Service"]
    argv = one(svc, "ExecStart").split()
    assert argv[0] == "/usr/bin/sevmigd" and argv[-1] == "/etc/sevmigd/sevmigd.toml"
    uid = gid = 65534
    # The service user runs this checkout's interpreter and package. A clone inside a directory other
    # users cannot enter (a 0700 home, `mktemp -d`) hides both from it; copying the venv (~150 MB) to a
    # readable place would cost more than the test, so say why and skip.
    probe = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--", sys.executable,
                            "-c", "import sevmigd.cli, trio, cryptography, msgpack, structlog, numpy"],
                           capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        why = (probe.stderr.strip().splitlines() or [f"exit status {probe.returncode}"])[-1]
        pytest.skip(f"uid {uid} cannot run this checkout's Python and package (a clone inside a directory "
                    f"other users cannot read?): {why}")
    root = pathlib.Path(tempfile.mkdtemp(prefix="sevmigd-unit-"))
    try:
        os.chmod(root, 0o755)
        state, runtime = root / "state", root / "run"
        state.mkdir(mode=0o700)
        runtime.mkdir(mode=0o750)
        for d in (state, runtime):
            os.chown(d, uid, gid)
        config = root / "sevmigd.toml"
        shutil.copy(EXAMPLE, config)
        os.chmod(config, 0o644)
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(root / "notify.sock"))
        os.chmod(root / "notify.sock", 0o777)  # like systemd's /run/systemd/notify
        notify.settimeout(60)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        # The ExecStart arguments, run by this venv's interpreter (entry point `sevmigd.cli:main`, what
        # /usr/bin/sevmigd runs) under UMask=0077. One exec, straight from setpriv: in some sandboxes the
        # interpreter's real path is not traversable by other users except on that first exec.
        argv = [sys.executable, "-c", "import os, sys; os.umask(0o077); from sevmigd.cli import main; "
                                      "sys.exit(main(sys.argv[1:]))", *argv[1:-1], str(config)]
        cmd = ["systemd-socket-activate", "-l", f"127.0.0.1:{port}",
               "-E", f"NOTIFY_SOCKET={root / 'notify.sock'}", "-E", f"STATE_DIRECTORY={state}",
               "-E", f"RUNTIME_DIRECTORY={runtime}", "-E", f"CONFIGURATION_DIRECTORY={root}",
               "setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--", *argv]
        log = open(root / "log", "wb")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.PIPE, cwd=root)
        # Drain stderr (systemd-socket-activate's chatter, a traceback if the daemon dies) into a list.
        errors: list[bytes] = []
        first = proc.stderr.readline()
        drain = threading.Thread(target=lambda: errors.extend(proc.stderr), daemon=True)
        drain.start()
        try:
            assert b"Listening on" in first
            # The first connection starts the daemon (as the socket unit would on a migration).
            with socket.create_connection(("127.0.0.1", port), timeout=60):
                pass
            while True:
                try:
                    msg = notify.recv(4096).decode()
                except TimeoutError:
                    pytest.fail(f"no READY=1; log:\n{(root / 'log').read_text()[-3000:]}\n"
                                f"stderr:\n{b''.join(errors).decode(errors='replace')[-3000:]}")
                if "READY=1" in msg:
                    break
            assert f"listening on 127.0.0.1:{port}" in msg
            ctl = runtime / "control.sock"
            st = os.stat(ctl)
            assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (uid, 0o600)
            keys = [p for p in state.rglob("*.key")]
            assert keys and all(stat.S_IMODE(p.stat().st_mode) == 0o600 and p.stat().st_uid == uid for p in keys)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0
            assert not ctl.exists()  # removed on a clean stop
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            drain.join(10)
            proc.stderr.close()
            log.close()
            notify.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


_MDWE_LAUNCHER = ("import ctypes, os, sys\n"
                  "libc = ctypes.CDLL(None, use_errno=True)\n"
                  "if libc.prctl(65, 1, 0, 0, 0) != 0:\n"        # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
                  "    sys.exit(97)\n"
                  "os.execv(sys.argv[1], sys.argv[1:])\n")       # inherited across execve


def test_daemons_migrate_with_memory_deny_write_execute(daemons, tmp_path):
    """Two real daemons under W^X (MemoryDenyWriteExecute=yes's kernel twin) with mutual TLS migrate a
    guest: the sandboxed configuration works end to end, not just at import time."""
    check = "import ctypes; print(ctypes.CDLL(None).prctl(66, 0, 0, 0, 0))"  # PR_GET_MDWE after execve
    probe = subprocess.run([sys.executable, "-c", _MDWE_LAUNCHER, sys.executable, "-c", check],
                           capture_output=True, text=True, timeout=60)
    if probe.returncode == 97:
        pytest.skip("kernel lacks PR_SET_MDWE (Linux >= 6.3)")
    assert probe.stdout.strip() == "1", "W^X must survive execve so that the daemon runs under it"
    launcher = [sys.executable, "-c", _MDWE_LAUNCHER]
    a, b = (daemons(name, launcher=launcher) for name in ("a", "b"))  # mutual TLS: the default
    a.execute("launch", name="g1", memory=8 << 20, dirty_rate=1.0)
    assert a.execute("migrate", name="g1", to=b.address, timeout=120)["status"] == "completed"
    assert b.execute("verify", name="g1")["ok"] is True


# Runs inside `unshare --mount`: the unit's filesystem sandbox, approximated with mounts (systemd does
# the same with its own mount namespace): ProtectSystem=strict (every mount read-only except the
# state/runtime dirs, here the test's workdir), ProcSubset=pid + ProtectProc=invisible (a private
# /proc with only processes), UMask=0077, and W^X via PR_SET_MDWE. Then exec the daemon.
_SANDBOX_LAUNCHER = textwrap.dedent("""
    import ctypes, os, subprocess, sys
    writable = sys.argv[1]
    def mount(*args):
        subprocess.run(["mount", *args], check=True)
    mount("--make-rprivate", "/")
    mount("-t", "proc", "-o", "subset=pid,hidepid=invisible", "proc", "/proc")
    mount("--bind", writable, writable)
    for line in open("/proc/self/mounts").read().splitlines():
        target = line.split()[1].encode().decode("unicode_escape")
        if target != writable and not target.startswith(("/proc", "/sys", "/dev")):
            subprocess.run(["mount", "-o", "remount,bind,ro", target], stderr=subprocess.DEVNULL)
    os.umask(0o077)
    if ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) != 0:
        sys.exit(97)
    os.execv(sys.argv[2], sys.argv[2:])
""")


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="needs root and unshare(1) to build the mount sandbox")
def test_daemons_migrate_inside_an_approximated_unit_sandbox(daemons, tmp_path):
    probe = subprocess.run(["unshare", "--mount", "--", sys.executable, "-c", _SANDBOX_LAUNCHER, str(tmp_path),
                            "/bin/sh", "-c", "touch /usr/.sevmigd-probe 2>/dev/null && exit 3; "
                                             "test -e /proc/cpuinfo && exit 4; touch $0/ok", str(tmp_path)],
                           capture_output=True, text=True, timeout=60)
    if probe.returncode == 97:
        pytest.skip("kernel lacks PR_SET_MDWE")
    if probe.returncode != 0 and "mount" in probe.stderr:
        pytest.skip(f"cannot build mount namespaces here: {probe.stderr.strip()[:200]}")
    assert probe.returncode == 0 and (tmp_path / "ok").exists(), (probe.returncode, probe.stderr)
    launcher = ["unshare", "--mount", "--", sys.executable, "-c", _SANDBOX_LAUNCHER, str(tmp_path)]
    # The control socket lives in the work dir: only tmp_path is writable inside the sandbox.
    a, b = (daemons(name, launcher=launcher, control=str(tmp_path / name / "control.sock")) for name in ("a", "b"))
    a.execute("launch", name="g1", memory=8 << 20, dirty_rate=1.0)
    assert a.execute("migrate", name="g1", to=b.address, timeout=120)["status"] == "completed"
    assert b.execute("verify", name="g1")["ok"] is True
    for d in (a, b):
        assert d.terminate() == 0
