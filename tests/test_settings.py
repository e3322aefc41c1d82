from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from longlived import ConfigError, Settings, load_settings
from longlived.cli import _parser


def _from_cli(argv: list[str]) -> Settings:
    parser, sources = _parser()
    namespace = parser.parse_args(argv)
    return Settings(_cli_settings_source=sources[namespace.command](parsed_args=namespace))


def test_defaults_match_the_original_example() -> None:
    settings = Settings()
    assert settings.address == "127.0.0.1:7070"
    assert (settings.host, settings.port) == ("127.0.0.1", 7070)
    assert settings.interval == 1.0
    assert (settings.count, settings.stagger) == (10, 2.0)
    assert settings.backoff.to_backoff().max == 120.0


def test_env_vars_and_nested_delimiter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LONGLIVED_INTERVAL", "0.25")
    monkeypatch.setenv("LONGLIVED_ADDRESS", "[::1]:9000")
    monkeypatch.setenv("LONGLIVED_BACKOFF__MAX", "30")
    monkeypatch.setenv("LONGLIVED_QUEUE__SIZE", "8")
    settings = load_settings()
    assert settings.interval == 0.25
    assert (settings.host, settings.port) == ("::1", 9000)
    assert settings.backoff.max == 30.0
    assert settings.queue.size == 8


def test_dotenv_is_read_and_env_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("LONGLIVED_COUNT=3\nLONGLIVED_STAGGER=0.5\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LONGLIVED_STAGGER", "0.1")
    settings = Settings()
    assert settings.count == 3
    assert settings.stagger == 0.1


def test_flags_override_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LONGLIVED_INTERVAL", "5")
    monkeypatch.setenv("LONGLIVED_BACKOFF__INITIAL", "2")
    settings = _from_cli(["serve", "--interval", "0.5", "--backoff.max", "9"])
    assert settings.interval == 0.5
    assert settings.backoff.initial == 2.0
    assert settings.backoff.max == 9.0


@pytest.mark.parametrize(
    ("env", "value", "fragment"),
    [
        ("LONGLIVED_INTERVAL", "-1", "greater than 0"),
        ("LONGLIVED_ADDRESS", "nonsense", "host:port"),
        ("LONGLIVED_ADDRESS", "127.0.0.1:99999", "0-65535"),
        ("LONGLIVED_COUNT", "many", "integer"),
        ("LONGLIVED_BACKOFF__JITTER", "2", "less than 1"),
        ("LONGLIVED_LOG_LEVEL", "LOUD", "DEBUG"),
        # not JSON where a setting needs it: the variable, the value and the format expected
        ("LONGLIVED_AUTH__TOKENS", "{s3cret: alice}",
         'expected JSON, an object such as {"name": "value"} (Expecting'),
        ("LONGLIVED_TOPICS", "news,sports", 'expected JSON, a list such as ["a", "b"] (Expecting'),
    ],
)  # fmt: skip
def test_invalid_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, fragment: str
) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert env in message
    assert repr(value) in message
    assert fragment in message


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``longlived *args`` with only ``env`` (and an empty PATH) in its environment."""
    return subprocess.run(
        [sys.executable, "-m", "longlived", *args],
        env={**(env or {}), "PATH": ""},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_cli_reports_invalid_values_in_one_line_without_traceback() -> None:
    result = cli("serve", env={"LONGLIVED_INTERVAL": "-1"})
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "longlived: invalid LONGLIVED_INTERVAL (flag --interval) = '-1': "
        "Input should be greater than 0"
    ]


def test_cli_flag_error_is_clear() -> None:
    result = cli("clients", "--count", "0")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "LONGLIVED_COUNT (flag --count) = '0'" in result.stderr


@pytest.mark.parametrize("word", ["null", "None", "NULL", " none "])
def test_null_or_none_unsets_optional_settings_from_env(
    monkeypatch: pytest.MonkeyPatch, word: str
) -> None:
    monkeypatch.setenv("LONGLIVED_KEEPALIVE__TIME", word)
    monkeypatch.setenv("LONGLIVED_MAX_CONNECTION_AGE", word)
    monkeypatch.setenv("LONGLIVED_METRICS__PORT", word)
    settings = load_settings()
    assert settings.keepalive.time is None
    assert settings.max_connection_age is None
    assert settings.metrics.port is None


def test_null_or_none_unsets_optional_settings_from_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LONGLIVED_MAX_CONNECTION_AGE", "60")
    settings = _from_cli(["serve", "--keepalive.time", "None", "--max-connection-age", "null"])
    assert (settings.keepalive.time, settings.max_connection_age) == (None, None)


def test_null_is_no_number_for_a_setting_that_needs_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LONGLIVED_INTERVAL", "null")
    with pytest.raises(ConfigError, match="LONGLIVED_INTERVAL"):
        load_settings()


def test_cli_reports_bad_json_in_one_line() -> None:
    result = cli("serve", env={"LONGLIVED_AUTH__TOKENS": "{bad"})
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(
        "longlived: invalid LONGLIVED_AUTH__TOKENS (flag --auth.tokens) = '{bad': expected JSON"
    )
