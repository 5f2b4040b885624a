"""The CLI front: one-line errors for expected failures, tracebacks for bugs, RESCUE_* defaults."""

from __future__ import annotations

import argparse

import pytest

from rescue import cli
from rescue.errors import ConfigError


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
    assert expected <= set(commands)
    for name in sorted(commands):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([name, "--help"])
        assert exit_info.value.code == 0
        assert capsys.readouterr().out.startswith("usage: rescue")
