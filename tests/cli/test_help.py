"""Every option of `sllm` and `sllm-store` says what it does, and its default when it has one."""

from __future__ import annotations

import argparse

import pytest

from sllm.cli.client import walk_parsers
from sllm.cli.main import build_parser
from sllm.cli.store import _parser as store_parser


def _options(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        yield action


@pytest.mark.parametrize("build", [build_parser, store_parser], ids=["sllm", "sllm-store"])
def test_every_option_has_help_and_shows_its_default(build):
    parsers = list(walk_parsers(build()))
    names = {p.prog for p in parsers}
    assert len(parsers) > 4, names  # the walk reached the subcommands
    for parser in parsers:
        formatter = parser._get_formatter()
        for action in _options(parser):
            where = f"{parser.prog} {'/'.join(action.option_strings) or action.dest}"
            assert action.help and action.help.strip(), f"{where} has no help"
            shown = formatter._expand_help(action)
            if action.default not in (None, False, [], argparse.SUPPRESS):
                assert "default" in shown.lower(), f"{where}: default not shown in {shown!r}"
        parser.format_help()  # renders (no bad % in a help string)


def test_jobs_commands_are_there():
    parsers = {p.prog for p in walk_parsers(build_parser())}
    for cmd in ("submit", "list", "get", "events", "logs", "cancel", "follow"):
        assert f"sllm jobs {cmd}" in parsers
