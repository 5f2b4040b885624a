"""The CLI front: one-line errors for expected failures, tracebacks for bugs, RESCUE_* defaults."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

import pytest

from rescue import cli
from rescue.client import DEFAULT_COHORT
from rescue.commands import relay as relay_command
from rescue.errors import ConfigError
from rescue.relay import DEFAULT_ADMIN_PORT, DEFAULT_PORT

RESCUE = [sys.executable, "-P", "-m", "rescue.cli"]


def test_expected_errors_inside_groups_become_one_line() -> None:
    group = ExceptionGroup("outer", [ConfigError("bad key"), ExceptionGroup("inner", [OSError("port")])])
    assert cli._user_errors(group) == ["bad key", "port"]


def test_a_bug_anywhere_in_a_group_is_not_hidden() -> None:
    group = ExceptionGroup("outer", [ConfigError("bad key"), KeyError("bug")])
    assert cli._user_errors(group) is None
    assert cli._user_errors(ValueError("bug")) is None


def test_add_option_reads_rescue_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESCUE_NODE_ID", "from-env")
    monkeypatch.setenv("RESCUE_VERBOSE_MODE", "yes")
    parser = argparse.ArgumentParser()
    cli.add_option(parser, "--node-id", required=True)
    cli.add_option(parser, "--verbose-mode", action="store_true")
    args = parser.parse_args([])
    assert args.node_id == "from-env"
    assert args.verbose_mode is True
    assert parser.parse_args(["--node-id", "flag"]).node_id == "flag"


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    expected = {"keygen", "mint", "verify", "relay", "token-service", "dev", "share", "join", "admin"}
    expected |= {"probe"}
    assert expected <= set(commands)
    for name in sorted(commands):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([name, "--help"])
        assert exit_info.value.code == 0
        assert capsys.readouterr().out.startswith("usage: rescue")


def _help(*args: str) -> str:
    result = subprocess.run(
        [*RESCUE, *args, "--help"], capture_output=True, text=True, timeout=30, check=True, env=_clean_env()
    )
    return result.stdout


def _clean_env() -> dict[str, str]:
    """The environment without RESCUE_* settings (they would change defaults and required flags)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("RESCUE_")}


def test_share_and_join_help_say_where_the_passphrase_comes_from() -> None:
    for command in ("share", "join"):
        text = _help(command)
        assert "RESCUE_PASSPHRASE" in text, command
        assert "RESCUE_SERVICE_KEY" in text, command
        assert "(default: http://127.0.0.1:8080)" in text, command  # --api
        assert f"(default: {DEFAULT_COHORT})" in text, command  # --cohort


def test_help_shows_defaults() -> None:
    dev = _help("dev")
    for port in ("8080", "8081", "9090"):
        assert f"(default: {port})" in dev
    relay = _help("relay")
    assert f"(default: {DEFAULT_PORT})" in relay
    assert f"(default: {DEFAULT_ADMIN_PORT})" in relay
    assert "(default: 8080)" in _help("token-service")
    assert "(default: http://127.0.0.1:8080)" in _help("admin", "status")


def test_every_admin_action_is_described_and_every_option_has_help() -> None:
    parser = cli.build_parser()
    admin = parser._subparsers._group_actions[0].choices["admin"]  # type: ignore[union-attr]
    actions = admin._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert set(actions) == {"pause", "resume", "status", "init-store", "cohort"}
    for name, action_parser in actions.items():
        assert action_parser.description, name
        for option in action_parser._actions:
            assert option.help, (name, option.option_strings)
    admin_help = _help("admin")
    assert "secrets.token_urlsafe" in admin_help  # what an admin key is and how to make one
    assert "RESCUE_ADMIN_KEY" in admin_help
    service_help = _help("token-service")
    assert "secrets.token_urlsafe" in service_help
    assert "rescue keygen" in service_help


def _every_parser(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += _every_parser(sub)
    return found


def test_every_option_of_every_command_has_help() -> None:
    for parser in _every_parser(cli.build_parser()):
        for action in parser._actions:
            if action.option_strings:
                assert action.help, (parser.prog, action.option_strings)


def test_relay_without_key_source_names_the_flags() -> None:
    result = subprocess.run(
        [*RESCUE, "relay", "--admin-port", "-1"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env=_clean_env(),
    )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr  # one line, no log record before it
    assert "--keys is required unless --token-service is set" in result.stderr
    assert "token_service" not in result.stderr


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--max-sessions", "0"], "--max-sessions must be >= 1"),
        (["--handshakes-per-ip-per-min", "-1"], "--handshakes-per-ip-per-min must be >= 0"),
        (["--drain-s", "0"], "--drain-s must be positive"),
        (["--tls-cert", "c.pem"], "--tls-cert and --tls-key go together"),
        (["--read-coalesce-s", "2"], "--read-coalesce-s must be between 0 and 1"),
    ],
)
def test_relay_config_errors_use_flag_names(flags: list[str], expected: str) -> None:
    args = cli.build_parser().parse_args(["relay", "--keys", "k.json", *flags])
    with pytest.raises(ConfigError) as info:
        relay_command.build_config(args, {})
    message = str(info.value)
    assert expected in message
    assert not re.search(r"\b[a-z]+_[a-z_]+\b", message.replace(expected, "")), message


def _choices(parser: argparse.ArgumentParser) -> set[str]:
    return set(parser._subparsers._group_actions[0].choices)  # type: ignore[union-attr]


def test_the_command_table_is_what_each_module_registers() -> None:
    import importlib

    every: set[str] = set()
    for module, commands in cli.COMMAND_MODULES.items():
        parser = argparse.ArgumentParser()
        importlib.import_module(module).register(parser.add_subparsers())
        assert _choices(parser) == set(commands), module
        every |= set(commands)
    assert _choices(cli.build_parser()) == every
    for command in every:
        assert _choices(cli.build_parser([command, "--help"])) == set(
            next(commands for commands in cli.COMMAND_MODULES.values() if command in commands)
        )
    # anything but a known command first gets the whole parser, so its usage error lists them all
    for argv in ([], ["--version"], ["nonsense"], ["--help", "relay"]):
        assert _choices(cli.build_parser(argv)) == every


def test_an_admin_command_does_not_load_the_servers() -> None:
    # `rescue admin …` is what an operator types during an incident: it imports only its own module
    code = (
        "import sys\n"
        "from rescue import cli\n"
        "cli.build_parser(['admin', 'status']).parse_args(['admin', 'status'])\n"
        "print(sorted(m for m in ('trio', 'redis', 'prometheus_client') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True, env=_clean_env()
    )
    assert result.stdout.strip() == "[]"
