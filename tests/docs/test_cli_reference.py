"""docs/cli.md is what tools/cli_reference.py renders from the parser as it is now."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _tool():
    spec = importlib.util.spec_from_file_location("cli_reference", ROOT / "tools" / "cli_reference.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_checked_in_cli_reference_is_what_the_parser_gives():
    page = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert page == _tool().render(), "docs/cli.md is stale: run python tools/cli_reference.py"


def test_the_cli_reference_names_every_subcommand_option_and_choice():
    from neuronpatch.cli import build_parser

    page = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    subs = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subs.choices) == {"run", "rank", "train-head", "conformance"}
    for name, sub in subs.choices.items():
        section = page.split(f"## `neuronpatch {name}`", 1)[1].split("\n## ", 1)[0]
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            for flag in action.option_strings:
                assert f"`{flag}" in section, (name, flag)
            for choice in action.choices or ():
                assert str(choice) in section, (name, action.dest, choice)
            if action.help:
                assert action.help.replace("|", "\\|") in section, (name, action.dest)


def test_check_mode_fails_on_a_stale_page(tmp_path, monkeypatch, capsys):
    tool = _tool()
    stale = tmp_path / "cli.md"
    stale.write_text(tool.render().replace("--route", "--path"), encoding="utf-8")
    monkeypatch.setattr(tool, "PAGE", stale)
    assert tool.main(["--check"]) == 1
    assert "differs from the parser" in capsys.readouterr().err
    stale.write_text(tool.render(), encoding="utf-8")
    assert tool.main(["--check"]) == 0
