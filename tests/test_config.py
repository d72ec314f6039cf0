"""Daemon configuration: defaults, TOML, flag precedence, and one clear error naming the key.

Pure tests of `sevmigd.daemon.config` plus two subprocess checks that `sevmigd serve` turns a bad
config into exit status 2 and a line naming the key (no traceback).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sevmigd.daemon.config import (
    DEFAULT_LISTEN,
    RELOADABLE,
    Config,
    default_control_path,
    default_runtime_dir,
    default_state_dir,
    load_config,
    split_host_port,
)
from sevmigd.errors import ConfigError

ENV = {"HOME": "/home/u", "XDG_RUNTIME_DIR": "/run/user/1000"}


def _write(tmp_path, text: str):
    p = tmp_path / "sevmigd.toml"
    p.write_text(text)
    return str(p)


def test_defaults_without_any_configuration():
    cfg = load_config(None, {}, environ=ENV)
    assert cfg.listen == DEFAULT_LISTEN == "127.0.0.1:4446"
    assert (cfg.listen_host, cfg.listen_port) == ("127.0.0.1", 4446)
    assert cfg.log_level == "info" and cfg.log_format == "auto"
    assert cfg.control_group is None and cfg.trusted_roots is None
    assert cfg.allowed_platforms is None and cfg.allowed_oca is None
    assert cfg.max_guest_bytes == 64 << 30
    assert (cfg.max_incoming, cfg.max_outgoing) == (4, 1)  # Nova: one outgoing at a time, the rest queue
    assert (cfg.handshake_timeout_s, cfg.peer_timeout_s, cfg.keepalive_interval_s) == (10, 10, 1)
    assert cfg.downtime_limit_ms == 300 and cfg.max_bandwidth_mib_s == 0
    assert (cfg.max_rounds, cfg.max_total_s) == (30, 600)
    assert cfg.psp_min_command_time_us == 0 and cfg.max_unauthenticated == 64
    assert cfg.psp_workers == 1
    # Mutual TLS is the default, with this host's certificate in the state dir (`platform init` writes it).
    assert cfg.tls.enabled and cfg.tls.state_dir_default and not cfg.insecure_plaintext
    assert (cfg.tls.cert, cfg.tls.key, cfg.tls.ca) == tuple(f"{cfg.state_dir}/tls/{n}.pem" for n in ("cert", "key", "ca"))


def test_default_paths_follow_systemd_then_xdg(monkeypatch):
    env = {"STATE_DIRECTORY": "/var/lib/sevmigd:/var/lib/other", "RUNTIME_DIRECTORY": "/run/sevmigd",
           **ENV}
    assert default_state_dir(env) == "/var/lib/sevmigd"
    assert default_control_path(env) == "/run/sevmigd/control.sock"
    if os.geteuid() != 0:
        assert default_control_path(ENV) == "/run/user/1000/sevmigd/control.sock"
        assert default_state_dir(ENV) == "/home/u/.local/state/sevmigd"
        assert default_control_path({"HOME": "/h"}) == f"/tmp/sevmigd-{os.getuid()}/control.sock"
        assert default_state_dir({"HOME": "/h", "XDG_STATE_HOME": "/x"}) == "/x/sevmigd"
    else:
        assert default_control_path(ENV) == "/run/sevmigd/control.sock"


def test_runtime_dir_is_systemds_else_named_after_the_control_socket(tmp_path):
    assert default_runtime_dir("/x/control.sock", {"RUNTIME_DIRECTORY": "/run/sevmigd:/run/o"}) == "/run/sevmigd"
    assert default_runtime_dir("/tmp/a.sock", {}) == "/tmp/a.run"
    # two daemons with two control sockets get two runtime directories; an explicit key wins
    a = load_config(None, overrides={"control": str(tmp_path / "a.sock")}, environ={"HOME": str(tmp_path)})
    b = load_config(None, overrides={"control": str(tmp_path / "b.sock")}, environ={"HOME": str(tmp_path)})
    assert (a.runtime_dir, b.runtime_dir) == (str(tmp_path / "a.run"), str(tmp_path / "b.run"))
    c = load_config(None, overrides={"control": str(tmp_path / "a.sock"), "runtime_dir": str(tmp_path / "r")},
                    environ={"HOME": str(tmp_path)})
    assert c.runtime_dir == str(tmp_path / "r")


def test_toml_values_are_loaded(tmp_path):
    path = _write(tmp_path, """
state_dir = "/srv/sevmigd"
listen = "[::1]:5000"
control = "/srv/ctl.sock"
control_group = "sevmigd"
log_level = "DEBUG"
log_format = "json"
trusted_roots = ["/etc/sevmigd/ark.cert"]
allowed_platforms = ["0123456789ABCDEF0123"]
max_guest_bytes = "8G"
max_incoming = 2
downtime_limit_ms = 500
max_bandwidth_mib_s = 125.5
peer_timeout_s = 5
keepalive_interval_s = 0.5
[tls]
cert = "/etc/sevmigd/tls.crt"
key = "/etc/sevmigd/tls.key"
ca = "/etc/sevmigd/ca.crt"
""")
    cfg = load_config(path, {}, environ=ENV)
    assert cfg.state_dir == "/srv/sevmigd" and cfg.control == "/srv/ctl.sock"
    assert (cfg.listen_host, cfg.listen_port) == ("::1", 5000)
    assert cfg.control_group == "sevmigd"
    assert cfg.log_level == "debug" and cfg.log_format == "json"
    assert cfg.trusted_roots == ("/etc/sevmigd/ark.cert",)
    assert cfg.allowed_platforms == ("0123456789abcdef0123",)
    assert cfg.max_guest_bytes == 8 << 30
    assert cfg.max_incoming == 2 and cfg.downtime_limit_ms == 500 and cfg.max_bandwidth_mib_s == 125.5
    assert cfg.tls.enabled and cfg.tls.ca == "/etc/sevmigd/ca.crt"


def test_flags_win_over_toml_and_none_means_not_given(tmp_path):
    path = _write(tmp_path, 'listen = "0.0.0.0:4446"\nlog_level = "warning"\nstate_dir = "/a"\n')
    cfg = load_config(path, {"listen": "127.0.0.1:0", "log_level": None, "state_dir": "/b"}, environ=ENV)
    assert cfg.listen == "127.0.0.1:0" and cfg.listen_port == 0
    assert cfg.log_level == "warning"      # flag not given: the file's value stays
    assert cfg.state_dir == "/b"


@pytest.mark.parametrize("text, key", [
    ('max_incoming = "four"', "max_incoming"),
    ("max_incoming = -1", "max_incoming"),
    ("max_incoming = true", "max_incoming"),
    ("max_rounds = 0", "max_rounds"),
    ('log_level = "loud"', "log_level"),
    ('log_format = "xml"', "log_format"),
    ('listen = "localhost"', "listen"),
    ('listen = "127.0.0.1:99999"', "listen"),
    ('listen = "::1:4446"', "listen"),
    ("peer_timeout_s = 0", "peer_timeout_s"),
    ("handshake_timeout_s = -3", "handshake_timeout_s"),
    ("max_bandwidth_mib_s = -1", "max_bandwidth_mib_s"),
    ('max_guest_bytes = "lots"', "max_guest_bytes"),
    ("max_guest_bytes = 100", "max_guest_bytes"),
    ('state_dir = ""', "state_dir"),
    ("trusted_roots = [1]", "trusted_roots[0]"),
    ('allowed_platforms = ["xyz"]', "allowed_platforms[0]"),
    ("downtime_limit_ms = 1.5", "downtime_limit_ms"),
    ('max_unauthenticated = 0', "max_unauthenticated"),
    ('keepalive_interval_s = 20', "keepalive_interval_s"),   # >= peer_timeout_s
    ('tls = "on"', "tls"),
    ('insecure_plaintext = "yes"', "insecure_plaintext"),
    ('insecure_plaintext = true\n[tls]\ncert = "/c"\nkey = "/k"\nca = "/a"', "insecure_plaintext"),
    ('[tls]\ncert = "/c"', "tls.key"),
    ('[tls]\ncert = "/c"\nkey = "/k"\nca = "/a"\npin = "x"', "tls.pin"),
    ('[tls]\ncert = "/c"\nkey = "/k"\nca = "/a"\nstate_dir_default = true', "tls.state_dir_default"),
    ("maxincoming = 3", "maxincoming"),                         # typo: unknown key
])
def test_bad_values_name_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as ei:
        load_config(_write(tmp_path, text), {}, environ=ENV)
    assert ei.value.key == key
    assert key in str(ei.value)


def test_bad_override_names_the_key():
    with pytest.raises(ConfigError) as ei:
        load_config(None, {"listen": "nonsense"}, environ=ENV)
    assert ei.value.key == "listen"
    with pytest.raises(ConfigError) as ei:
        load_config(None, {"no_such": 1}, environ=ENV)
    assert ei.value.key == "no_such"


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError) as ei:
        load_config(str(tmp_path / "nope.toml"), {}, environ=ENV)
    assert ei.value.key == "config" and "no such file" in str(ei.value)
    with pytest.raises(ConfigError) as ei:
        load_config(_write(tmp_path, "listen = \n"), {}, environ=ENV)
    assert ei.value.key == "config" and "invalid TOML" in str(ei.value)


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:4446", ("127.0.0.1", 4446)),
    ("[::]:0", ("::", 0)),
    (":4446", ("0.0.0.0", 4446)),
    ("host.example:1", ("host.example", 1)),
])
def test_split_host_port(text, expected):
    assert split_host_port(text) == expected


def test_reloadable_changes_split_keys():
    old = load_config(None, {"state_dir": "/s", "control": "/c"}, environ=ENV)
    new = load_config(None, {"state_dir": "/s2", "control": "/c", "log_level": "debug", "max_incoming": 9},
                      environ=ENV)
    apply, ignored = old.reloadable_changes(new)
    assert apply == {"log_level": "debug", "max_incoming": 9}
    assert ignored == ["state_dir", "tls"]  # the default TLS paths live in the state dir
    assert "listen" not in RELOADABLE and "control" not in RELOADABLE and "log_level" in RELOADABLE


def test_config_is_immutable():
    cfg = load_config(None, {}, environ=ENV)
    assert isinstance(cfg, Config)
    with pytest.raises(AttributeError):
        cfg.listen = "x"  # type: ignore[misc]


def _sevmigd(*argv, timeout=60):
    return subprocess.run([sys.executable, "-m", "sevmigd", *argv], capture_output=True, text=True,
                          timeout=timeout)


def test_serve_with_bad_config_exits_2_naming_the_key(tmp_path):
    path = _write(tmp_path, "max_outgoing = \"many\"\n")
    res = _sevmigd("serve", "--config", path, "--state-dir", str(tmp_path / "s"),
                   "--control", str(tmp_path / "c.sock"))
    assert res.returncode == 2
    assert "max_outgoing" in res.stderr
    assert "Traceback" not in res.stderr


def test_serve_flag_error_exits_2(tmp_path):
    res = _sevmigd("serve", "--listen", "no-port-here", "--state-dir", str(tmp_path / "s"),
                   "--control", str(tmp_path / "c.sock"))
    assert res.returncode == 2
    assert "listen" in res.stderr and "Traceback" not in res.stderr


# ------------------------------------------------------------------ fleet operation (issue 12)


def test_policies_metrics_and_queue_keys(tmp_path):
    path = _write(tmp_path, """
metrics_listen = "127.0.0.1:9446"
default_policy = "drain"
max_queued_outgoing = 8
outgoing_bandwidth_mib_s = 1000

[policies.drain]
bandwidth_mib_s = 500
downtime_limit_ms = 500
auto_converge = false
completion_timeout_per_gib_s = 800
completion_action = "force-complete"
progress_timeout_s = 150
""")
    cfg = load_config(path, {}, environ=ENV)
    assert cfg.metrics_listen == "127.0.0.1:9446" and cfg.max_queued_outgoing == 8
    pol = cfg.policy(None)
    assert pol.name == "drain" and pol.completion_action == "force-complete" and not pol.auto_converge
    assert pol.completion_timeout_s(2 << 30) == 1600
    assert cfg.policy("drain") is pol
    assert load_config(None, {}, environ=ENV).metrics_listen is None  # off by default
    assert {"policies", "default_policy", "max_outgoing"} <= RELOADABLE


@pytest.mark.parametrize("text,key", [
    ('[policies.x]\ncompletion_action = "retry"\n', "policies.x.completion_action"),
    ('[policies.x]\nbandwith_mib_s = 1\n', "policies.x.bandwith_mib_s"),
    ('[policies.x]\nprogress_timeout_s = -1\n', "policies.x.progress_timeout_s"),
    ('[policies."bad name"]\n', "policies.bad name"),
    ('default_policy = "missing"\n', "default_policy"),
    ('metrics_listen = "nowhere"\n', "metrics_listen"),
])
def test_bad_policy_settings_name_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as ei:
        load_config(_write(tmp_path, text), {}, environ=ENV)
    assert ei.value.key == key


def test_unknown_policy_name_is_a_config_error():
    cfg = load_config(None, {}, environ=ENV)
    assert cfg.policy(None) is None
    with pytest.raises(ConfigError) as ei:
        cfg.policy("fast")
    assert ei.value.key == "policy" and "none configured" in str(ei.value)
