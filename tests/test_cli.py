"""Command line: entry points and --help of every subcommand."""

import subprocess
import sys

import pytest

from ldm_scaling import cli

SUBCOMMANDS = ["cost", "config"]


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help(command, capsys):
  with pytest.raises(SystemExit) as e:
    cli.main([command, "--help"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  assert f"ldm-scaling {command}" in out and "--config" in out


def test_module_entry_point_and_config_command(repo_dir):
  out = subprocess.run([sys.executable, "-m", "ldm_scaling", "config", "--config",
                        "configs/t2i.py:width=128", "--config.train.steps=7", "--json"],
                       cwd=repo_dir, capture_output=True, text=True, check=True).stdout
  import json  # pylint: disable=g-import-not-at-top
  data = json.loads(out)
  assert data["config"]["model"]["width"] == 128 and data["config"]["train"]["steps"] == 7
  assert len(data["hash"]) == 12


def test_unknown_argument_is_an_error(capsys):
  assert cli.main(["config", "--config", "configs/t2i.py", "--bogus"]) == 2
  assert "unrecognised argument '--bogus'" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    cli.main(["nosuchcommand"])
