"""Configuration: defaults for an empty directory, then TOML, then FLEETGATE_* variables."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetgate.config import (
    CONFIG_FILE,
    DEFAULT_CONFIG_TOML,
    CASettings,
    DatabaseSettings,
    EnrollmentSettings,
    LogSettings,
    load_config,
)
from fleetgate.errors import ConfigError


def _home(tmp_path: Path, toml: str | None = None) -> Path:
    home = tmp_path / "data"
    home.mkdir()
    if toml is not None:
        (home / CONFIG_FILE).write_text(toml)
    return home


def test_an_empty_directory_is_a_complete_configuration_of_defaults(tmp_path):
    home = _home(tmp_path)
    config = load_config(home, environ={})
    assert config.home == home
    assert config.ca == CASettings()
    assert config.enrollment == EnrollmentSettings()
    assert config.database == DatabaseSettings()
    assert config.log == LogSettings()
    assert config.enrollment.port == 8443
    assert config.enrollment.server_names == ("localhost", "127.0.0.1")
    assert config.ca.root_curve == "P-256"
    assert config.database_url == f"sqlite:///{home / 'registry.db'}"
    assert config.ca_dir == home / "ca"
    assert config.logs_dir == home / "logs"


def test_a_relative_home_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(Path("rel-home"), environ={})
    assert config.home == tmp_path / "rel-home"
    assert config.home.is_absolute()


def test_the_home_comes_from_fleetgate_home_when_not_given(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEETGATE_HOME", str(tmp_path / "from-env"))
    assert load_config(environ={}).home == tmp_path / "from-env"


def test_the_shipped_default_file_loads_and_changes_nothing(tmp_path):
    home = _home(tmp_path, DEFAULT_CONFIG_TOML)
    config = load_config(home, environ={})
    assert config.ca == CASettings()
    assert config.enrollment == EnrollmentSettings()
    assert config.database == DatabaseSettings()


def test_toml_values_override_the_defaults_with_their_types(tmp_path):
    home = _home(
        tmp_path,
        """
[ca]
root_curve = "P-384"
device_validity_days = 30
crl_url = "https://pki.example/crl"

[enrollment]
port = 9443
server_names = ["est.example", "10.0.0.5"]
tls_handshake_timeout_s = 2.5

[database]
url = "postgresql+psycopg://fleet@db/fleet"

[log]
level = "DEBUG"
""",
    )
    config = load_config(home, environ={})
    assert config.ca.root_curve == "P-384"
    assert config.ca.device_validity_days == 30
    assert config.ca.crl_url == "https://pki.example/crl"
    assert config.ca.ocsp_url == CASettings().ocsp_url  # untouched keys keep their default
    assert config.enrollment.port == 9443
    assert config.enrollment.server_names == ("est.example", "10.0.0.5")
    assert config.enrollment.tls_handshake_timeout_s == 2.5
    assert config.database_url == "postgresql+psycopg://fleet@db/fleet"
    assert config.log.level == "DEBUG"


def test_environment_variables_beat_the_file(tmp_path):
    home = _home(tmp_path, "[enrollment]\nport = 9000\nhost = '0.0.0.0'\n")
    env = {
        "FLEETGATE_ENROLLMENT_PORT": "9443",
        "FLEETGATE_CA_DEVICE_VALIDITY_DAYS": "7",
        "FLEETGATE_ENROLLMENT_TLS_HANDSHAKE_TIMEOUT_S": "0.5",
    }
    config = load_config(home, environ=env)
    assert config.enrollment.port == 9443
    assert isinstance(config.enrollment.port, int)
    assert config.ca.device_validity_days == 7
    assert config.enrollment.tls_handshake_timeout_s == 0.5
    assert config.enrollment.host == "0.0.0.0"  # from the file: no variable for it


def test_a_tuple_setting_comes_from_a_comma_list_in_the_environment(tmp_path):
    home = _home(tmp_path, "[enrollment]\nserver_names = ['file.example']\n")
    env = {"FLEETGATE_ENROLLMENT_SERVER_NAMES": " est.example, 10.0.0.5 ,,::1 "}
    config = load_config(home, environ=env)
    assert config.enrollment.server_names == ("est.example", "10.0.0.5", "::1")


def test_string_settings_from_the_environment_are_taken_verbatim(tmp_path):
    env = {"FLEETGATE_DATABASE_URL": "sqlite:////srv/fleet.db", "FLEETGATE_LOG_LEVEL": "warning"}
    config = load_config(_home(tmp_path), environ=env)
    assert config.database_url == "sqlite:////srv/fleet.db"
    assert config.log.level == "warning"


def test_unrelated_fleetgate_variables_are_not_settings(tmp_path):
    env = {"FLEETGATE_HOME": "/elsewhere", "FLEETGATE_CA_PASSPHRASE": "not-a-setting"}
    config = load_config(_home(tmp_path), environ=env)
    assert config.ca == CASettings()


def test_an_unknown_section_is_refused_by_name(tmp_path):
    home = _home(tmp_path, "[ca]\n[brokr]\nport = 1\n")
    with pytest.raises(ConfigError, match="brokr") as info:
        load_config(home, environ={})
    assert "unknown section" in info.value.message
    assert "enrollment" in info.value.message  # the known ones are listed


def test_an_unknown_key_is_refused_naming_it_and_its_section(tmp_path):
    home = _home(tmp_path, "[enrollment]\nprot = 9443\n")
    with pytest.raises(ConfigError, match="prot") as info:
        load_config(home, environ={})
    assert "[enrollment]" in info.value.message
    assert "port" in info.value.message  # the known keys are listed


def test_invalid_toml_is_a_config_error_naming_the_file(tmp_path):
    home = _home(tmp_path, "[enrollment\nport = \n")
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        load_config(home, environ={})
    assert CONFIG_FILE in info.value.message


def test_a_file_that_is_not_utf8_is_a_config_error(tmp_path):
    home = _home(tmp_path)
    (home / CONFIG_FILE).write_bytes(b"[ca]\nroot_curve = '\xff'\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(home, environ={})


def test_a_section_that_is_not_a_table_is_a_config_error(tmp_path):
    home = _home(tmp_path, "ca = 5\n")
    with pytest.raises(ConfigError, match=r"\[ca\]"):
        load_config(home, environ={})


@pytest.mark.parametrize("value", ['"many"', "true", "8443.5", "[8443]"])
def test_a_bad_int_in_the_file_is_a_config_error_naming_the_key(tmp_path, value):
    home = _home(tmp_path, f"[enrollment]\nport = {value}\n")
    with pytest.raises(ConfigError, match=r"\[enrollment\] port") as info:
        load_config(home, environ={})
    assert "int" in info.value.message


@pytest.mark.parametrize("value", ["many", "", "9443.0", "0x24"])
def test_a_bad_int_in_the_environment_is_a_config_error_naming_the_variable(tmp_path, value):
    env = {"FLEETGATE_ENROLLMENT_PORT": value}
    with pytest.raises(ConfigError, match="FLEETGATE_ENROLLMENT_PORT") as info:
        load_config(_home(tmp_path), environ=env)
    assert "int" in info.value.message


def test_a_bad_float_is_a_config_error(tmp_path):
    env = {"FLEETGATE_ENROLLMENT_TLS_HANDSHAKE_TIMEOUT_S": "soon"}
    with pytest.raises(ConfigError, match="TLS_HANDSHAKE_TIMEOUT_S"):
        load_config(_home(tmp_path), environ=env)


@pytest.mark.parametrize("value", ["5", "true", '["https://a"]'])
def test_a_non_string_for_a_string_setting_is_a_config_error(tmp_path, value):
    home = _home(tmp_path, f"[ca]\ncrl_url = {value}\n")
    with pytest.raises(ConfigError, match=r"\[ca\] crl_url"):
        load_config(home, environ={})


def test_a_non_list_for_a_list_setting_is_a_config_error(tmp_path):
    home = _home(tmp_path, "[enrollment]\nserver_names = 5\n")
    with pytest.raises(ConfigError, match="server_names"):
        load_config(home, environ={})


# -- the CA passphrase -------------------------------------------------------------------------


def test_the_passphrase_comes_from_the_environment_before_the_file(tmp_path, monkeypatch):
    home = _home(tmp_path, "[ca]\npassphrase_file = 'pass.txt'\n")
    (home / "pass.txt").write_text("from-the-file\n")
    monkeypatch.setenv("FLEETGATE_CA_PASSPHRASE", "from-the-env")
    assert load_config(home, environ={}).read_passphrase() == b"from-the-env"
    monkeypatch.delenv("FLEETGATE_CA_PASSPHRASE")
    assert load_config(home, environ={}).read_passphrase() == b"from-the-file"


def test_no_passphrase_configured_reads_as_none(tmp_path, monkeypatch):
    monkeypatch.delenv("FLEETGATE_CA_PASSPHRASE", raising=False)
    assert load_config(_home(tmp_path), environ={}).read_passphrase() is None


def test_a_missing_passphrase_file_is_a_config_error_naming_it(tmp_path, monkeypatch):
    monkeypatch.delenv("FLEETGATE_CA_PASSPHRASE", raising=False)
    home = _home(tmp_path, "[ca]\npassphrase_file = 'absent.txt'\n")
    with pytest.raises(ConfigError, match=r"absent\.txt"):
        load_config(home, environ={}).read_passphrase()
