"""Sweeps and launchers: expansions, the TPU command sequence (golden files), quoting, refusals,
the local launcher.

Golden files (tests/golden/*.txt) hold the exact `launch/tpu_vm.py ... --dry-run` output. After an
intended change of the generated commands, regenerate them and review the diff:

  LDM_SCALING_REGEN_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_launch.py -k golden
  git diff tests/golden/
"""

import dataclasses
import json
import os
import re
import shlex
import stat
import subprocess
import sys
import tarfile
import time

import pytest

from ldm_scaling import experiment
from ldm_scaling.errors import ConfigError
from ldm_scaling.cli import launch as commands
from ldm_scaling.launch import local, sweeps, topology, tpu
from ldm_scaling.models import cost

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(REPO, "tests", "golden")


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
  monkeypatch.chdir(REPO)  # config paths are relative to the repository root


def _expand(spec, **kw):
  return sweeps.expand(sweeps.load_sweep(spec), **kw)


def _sweep(**fields):
  sweep = sweeps.sweep_config()
  sweep.name = fields.pop("name", "s")
  sweep.base = fields.pop("base", "configs/t2i.py")
  for key, value in fields.items():
    sweep[key] = value
  return sweep


# -------------------------------------------------------------------------------------------------
# Sweep expansion.


def test_model_size_sweep_is_the_paper_widths_and_every_config_loads():
  runs = _expand("configs/sweeps/model_size.py")
  widths = sorted(cost.PAPER_TABLE1)
  assert len(widths) == 11 and len(runs) == 11
  assert [r.name for r in runs] == [f"w{w}" for w in widths]
  assert len({r.workdir for r in runs}) == 11
  assert all(r.workdir == f"{sweeps.DEFAULT_WORKDIR_ROOT}/model_size/w{w}"
             for r, w in zip(runs, widths))
  from ldm_scaling import experiment
  for run, width in zip(runs, widths):
    config = experiment.load(run.config, run.overrides)
    assert config.model.width == width and config.train.steps == 500_000
    # 64-wide heads need every level width (w, 2w, 4w, 4w) to be a multiple of 64: w itself.
    fixed_heads = width % 64 != 0
    assert config.model.num_heads == (8 if fixed_heads else 0), width
    assert ("model.num_heads=8" in run.overrides) == fixed_heads
  assert {w for w in widths if w % 64} == {96, 160, 224, 288}


def test_sweep_arguments_and_counts_are_the_product_of_the_axes():
  runs = _expand("configs/sweeps/sampler_steps.py:widths=(64,128),steps=1000")
  assert len(runs) == 2 * 3 * 6
  assert len({r.name for r in runs}) == len(runs)
  assert runs[0].name == "w64-ddim-s4" and runs[-1].name == "w128-dpm++-s50"
  assert runs[0].workdir.endswith("/model_size/w64") and runs[0].command == "eval"
  assert len({r.results for r in runs}) == 1  # one results table for the sweep
  cfg = _expand("configs/sweeps/cfg.py:widths=(64,128)")
  assert len(cfg) == 2 * 8 and cfg[1].name == "w64-cfg2"
  grouped = _expand("configs/sweeps/cfg.py:widths=(64,128),per_scale=false")
  assert [r.name for r in grouped] == ["w64", "w128"]
  assert "eval.cfg_scales=(1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0)" in grouped[0].overrides
  assert all(e is None for e in sweeps.validate_runs(cfg[:3] + grouped))


def test_zip_axis_steps_together_and_overrides_reach_every_run():
  sweep = _sweep(axes=(("model.width", (64, 128)),),
                 zip=(("train.lr", (1e-4, 2e-4, 4e-4)), ("train.steps", (10, 20, 40))),
                 labels=(("model.width", "w"), ("train.lr", "lr")),
                 overrides=(("train.batch_size", 8),))
  runs = sweeps.expand(sweep, workdir_root="gs://b/x", extra_overrides=["--config.train.seed=3"])
  assert len(runs) == 2 * 3
  from ldm_scaling import experiment
  pairs = []
  for run in runs:
    config = experiment.load(run.config, run.overrides)
    pairs.append((config.model.width, config.train.lr, config.train.steps))
    assert config.train.batch_size == 8 and config.train.seed == 3
  assert pairs == [(w, lr, s) for w in (64, 128)
                   for lr, s in ((1e-4, 10), (2e-4, 20), (4e-4, 40))]
  assert runs[0].name == "w64-lr0.0001-steps=10" and runs[0].workdir == "gs://b/x/s/" + runs[0].name


def test_unknown_axis_names_the_key_and_the_closest_valid_keys():
  with pytest.raises(ConfigError, match=r"unknown sweep axis 'model\.widht'.*model\.width"):
    sweeps.expand(_sweep(axes=(("model.widht", (64,)),)))
  with pytest.raises(ConfigError, match=r"'eval\.cfg_scale'.*eval\.cfg_scales"):
    sweeps.expand(_sweep(axes=(("eval.cfg_scale", (1.0,)),)))
  with pytest.raises(ConfigError, match="is a config section"):
    sweeps.expand(_sweep(axes=(("model", (64,)),)))
  with pytest.raises(ConfigError, match="same value of its axis 'model.width'"):
    sweeps.expand(_sweep(axes=(("model.width", (64, 128)),)),
                  extra_overrides=["--config.model.width=96"])
  with pytest.raises(ConfigError, match="unknown override 'train.stpes'.*train.steps"):
    sweeps.expand(_sweep(), extra_overrides=["train.stpes=3"])
  with pytest.raises(ConfigError, match="equal lengths"):
    sweeps.expand(_sweep(zip=(("train.lr", (1.0, 2.0)), ("train.steps", (1,)))))


def test_values_are_checked_by_loading_each_run():
  # Width 224 without the unet_heads rule: the key is valid, the value is not (heads of 64).
  runs = sweeps.expand(_sweep(axes=(("model.width", (128, 224)),)))
  errors = sweeps.validate_runs(runs)
  assert errors[0] is None and "num_heads" in errors[1]


def test_distillation_sweep_pairs_teachers_with_objectives():
  runs = _expand("configs/sweeps/distillation.py:widths=(128,224),student_steps=100,"
                 "objectives=(consistency,scale_wise)")
  assert [r.name for r in runs] == ["w128-consistency", "w128-scale_wise", "w224-consistency",
                                    "w224-scale_wise"]
  teachers = {r.name: r for r in _expand("configs/sweeps/model_size.py:widths=(128,224)")}
  for run in runs:
    teacher = teachers[run.name.split("-")[0]]
    assert f"teacher: {teacher.workdir}" in run.notes
    assert set(teacher.overrides) <= set(run.overrides)  # same width and heads as the teacher
    assert f"objective.teacher={teacher.workdir}" in run.overrides
    assert "data.caption_dropout=0.0" in run.overrides
    if run.name.endswith("consistency"):
      # Guidance-conditioned students (LCM's w input), evaluated over a CFG grid.
      assert {'eval.samplers=("lcm",)', "model.guidance_embed=true", "train.ema_decay=0.95",
              "objective.cfg_range=(1.0, 8.0)",
              "eval.cfg_scales=(1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0)"} <= set(run.overrides)
    else:  # SwD's own recipe: none of the consistency settings
      assert {'eval.samplers=("swd",)', "eval.steps=(4,)", "eval.cfg_scales=(1.0,)",
              "objective.scales=(32, 40, 48, 64)", "objective.sigmas=(1.0, 0.8, 0.6, 0.4)",
              "train.lr=5e-06"} <= set(run.overrides)
      assert not any(o.startswith(("model.guidance_embed", "objective.cfg_range",
                                   "train.ema_decay")) for o in run.overrides)
  from ldm_scaling import experiment
  student = experiment.load(runs[0].config, list(runs[0].overrides))
  assert student.model.guidance_embed and student.objective.cfg_range == (1.0, 8.0)
  assert student.eval.cfg_scales[0] == 1.0 and student.eval.cfg_scales[-1] == 8.0
  swd_student = experiment.load(runs[1].config, list(runs[1].overrides))
  assert swd_student.objective.name == "scale_wise" and not swd_student.model.guidance_embed
  fixed = _expand("configs/sweeps/distillation.py:widths=(128,),guidance=false")
  assert "eval.cfg_scales=(1.0,)" in fixed[0].overrides
  assert not any(o.startswith(("model.guidance_embed", "objective.cfg_range"))
                 for o in fixed[0].overrides)
  assert sweeps.validate_runs(runs) == [None] * 4


def test_conditional_overrides_need_an_axis_value():
  with pytest.raises(ConfigError, match="when 'train.lr': not an axis"):
    sweeps.expand(_sweep(axes=(("model.width", (64,)),),
                         when=(("train.lr", 1.0, (("train.steps", 2),)),)))
  with pytest.raises(ConfigError, match=r"when model.width=96: not one of the axis values \[64\]"):
    sweeps.expand(_sweep(axes=(("model.width", (64,)),),
                         when=(("model.width", 96, (("train.steps", 2),)),)))
  runs = sweeps.expand(_sweep(axes=(("model.width", (64, 128)),),
                              overrides=(("train.steps", 1),),
                              when=(("model.width", 128, (("train.steps", 2),)),)))
  assert ["train.steps=1" in r.overrides for r in runs] == [True, False]
  assert "train.steps=2" in runs[1].overrides


def test_format_value_round_trips_through_config_flags():
  from ldm_scaling import experiment
  config = experiment.load("configs/t2i.py", [
      "eval.samplers=" + sweeps.format_value(("dpm++", "ddim")),
      "eval.cfg_scales=" + sweeps.format_value((1.5,)),
      "train.async_checkpointing=" + sweeps.format_value(False),
      "train.lr=" + sweeps.format_value(2e-4)])
  assert config.eval.samplers == ("dpm++", "ddim") and config.eval.cfg_scales == (1.5,)
  assert config.train.async_checkpointing is False and config.train.lr == 2e-4


# -------------------------------------------------------------------------------------------------
# The CLI and the scripts.


def test_cli_dry_run_prints_one_shell_command_per_run():
  env = dict(os.environ, USE_TF="0")
  entry_point = os.path.join(os.path.dirname(sys.executable), "ldm-scaling")  # .venv/bin/
  proc = subprocess.run([entry_point, "sweep", "--config",
                         "configs/sweeps/model_size.py:widths=(64,224),steps=100", "--dry-run",
                         "--workdir-root", "runs/s"],
                        cwd=REPO, capture_output=True, text=True, env=env, check=False)
  assert proc.returncode == 0, proc.stderr
  lines = [l for l in proc.stdout.splitlines() if not l.startswith("#")]
  expected = [
      ["ldm-scaling", "train", "--config", "configs/t2i.py:steps=100",
       "--config.model.width=64", "--workdir", "runs/s/model_size/w64"],
      ["ldm-scaling", "train", "--config", "configs/t2i.py:steps=100",
       "--config.model.width=224", "--config.model.num_heads=8", "--workdir",
       "runs/s/model_size/w224"]]
  assert [shlex.split(l) for l in lines] == expected


def test_cli_refuses_invalid_runs_and_experiment_configs_without_workdir(capsys):
  assert commands.main(["--config", "configs/sweeps/distillation.py:widths=(64,)", "--dry-run"],
                       launcher="local", prog="launch/local.py") == 0
  assert "--config.objective.name=consistency" in capsys.readouterr().out
  # A run whose values do not load is INVALID and nothing launches.
  code = commands.main(["--config", "configs/sweeps/distillation.py:widths=(64,),"
                        "objectives=(consistency,scale_wise),swd_scales=(20,40,48,64)",
                        "--dry-run"], launcher="local", prog="launch/local.py")
  out = capsys.readouterr()
  assert code == 2
  assert "# INVALID w64-scale_wise:" in out.out and "not multiples of the UNet" in out.out
  assert "nothing launched" in out.err
  from ldm_scaling import cli
  assert cli.main(["sweep", "--config", "configs/t2i.py", "--dry-run"]) == 2
  assert "experiment config, not a sweep: give --workdir" in capsys.readouterr().err


def test_launch_script_runs_an_experiment_config_as_one_run():
  proc = subprocess.run([sys.executable, "launch/local.py", "--config", "configs/t2i.py:width=64",
                         "--workdir", "runs/w64", "--config.train.steps=5", "--dry-run"],
                        cwd=REPO, capture_output=True, text=True, check=False,
                        env=dict(os.environ, USE_TF="0"))
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.splitlines()[-1] == ("ldm-scaling train --config configs/t2i.py:width=64 "
                                          "--config.train.steps=5 --workdir runs/w64")


def test_sweep_help(capsys):
  from ldm_scaling import cli
  with pytest.raises(SystemExit) as e:
    cli.main(["sweep", "--help"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  assert "--dry-run" in out and "--accelerator-type" in out and "--parallel" in out


# -------------------------------------------------------------------------------------------------
# TPU VM launcher.

GOLDEN_CASES = {
    "tpu_model_size_v4-32.txt": [
        "--config", "configs/sweeps/model_size.py:widths=(64,224,768)", "--tpu-name", "ldm-v4",
        "--zone", "us-central2-b", "--project", "my-project", "--accelerator-type", "v4-32",
        "--bucket", "gs://my-bucket", "--source-tarball", "dist/ldm-scaling.tar.gz",
        "--jax-spec", "jax[tpu]==0.10.2", "--env", "TFDS_DATA_DIR=gs://my-bucket/tfds",
        "--env", "HF_HOME=~/hf-cache", "--log-every", "30", "--dry-run", "--plan", "off"],
    "tpu_cfg_v6e-8_queued.txt": [
        "--config", "configs/sweeps/cfg.py:widths=(128,),per_scale=false", "--tpu-name",
        "ldm-eval", "--zone", "europe-west4-a", "--accelerator-type", "v6e-8", "--queued",
        "--spot", "--bucket", "gs://my-bucket", "--source-git",
        "https://github.com/example/ldm-scaling.git", "--source-ref", "v0.1",
        "--jax-spec", "jax[tpu]==0.10.2", "--dry-run", "--plan", "off"],
    # The image has a Python >= 3.11: install into it and run with it, no uv.
    "tpu_t2i_v5litepod-8_remote_python.txt": [
        "--config", "configs/t2i.py:width=64", "--workdir", "gs://my-bucket/t2i/w64",
        "--tpu-name", "ldm-one", "--zone", "us-west4-a", "--accelerator-type", "v5litepod-8",
        "--skip-create", "--source-tarball", "dist/ldm-scaling.tar.gz", "--remote-python",
        "/opt/python3.12/bin/python3", "--jax-spec", "jax[tpu]==0.10.2", "--dry-run", "--plan",
        "off"],
    "tpu_teardown_queued.txt": [
        "--teardown", "--tpu-name", "ldm-v5p", "--zone", "us-east5-a", "--accelerator-type",
        "v5p-32", "--queued", "--best-effort", "--dry-run"],
}


@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_tpu_dry_run_matches_golden(name, capsys, monkeypatch):
  monkeypatch.setenv("PATH", "/nonexistent")  # the dry run needs no gcloud
  assert commands.main(GOLDEN_CASES[name], launcher="tpu", prog="launch/tpu_vm.py") == 0
  out = capsys.readouterr().out
  path = os.path.join(GOLDEN, name)
  if os.environ.get("LDM_SCALING_REGEN_GOLDEN"):
    os.makedirs(GOLDEN, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
      f.write(out)
  with open(path, encoding="utf-8") as f:
    assert out == f.read()


def _opts(**kw):
  base = dict(tpu_name="t", zone="z", accelerator_type="v4-32", jax_spec="jax[tpu]==1", plan="off")
  base.update(kw)
  return tpu.TpuOptions(**base)


def test_multi_host_slice_refuses_a_host_local_workdir():
  runs = _expand("configs/sweeps/model_size.py:widths=(64,)", workdir_root="/tmp/sweeps")
  with pytest.raises(tpu.LaunchError, match="host-local.*every worker must write the same"):
    tpu.plan(runs, _opts())
  assert tpu.plan(runs, _opts(workdir_is_shared=True))  # a mount every worker shares
  single = tpu.plan(runs, _opts(accelerator_type="v4-8"))  # one host: allowed, with a warning
  assert single[0].kind == "note" and "deleted with the slice" in single[0].comment
  gs = _expand("configs/sweeps/model_size.py:widths=(64,)", workdir_root="gs://b/r")
  assert all(s.kind != "note" for s in tpu.plan(gs, _opts()))


def test_missing_gcloud_is_a_clear_error_but_dry_run_works(monkeypatch, tmp_path, capsys):
  monkeypatch.setenv("PATH", str(tmp_path))
  args = ["--config", "configs/sweeps/model_size.py:widths=(64,)", "--tpu-name", "t", "--zone",
          "z", "--accelerator-type", "v4-8", "--bucket", "gs://b", "--source-tarball", "x.tgz",
          "--plan", "off"]
  assert commands.main(args + ["--dry-run"], launcher="tpu", prog="p") == 0
  assert "gcloud compute tpus tpu-vm create t" in capsys.readouterr().out
  assert commands.main(args, launcher="tpu", prog="p") == 2
  err = capsys.readouterr().err
  assert "gcloud (the Google Cloud CLI) is not on PATH" in err and "--dry-run" in err


def test_every_command_round_trips_through_the_shell_quoting():
  runs = _expand("configs/sweeps/cfg.py:widths=(64,),per_scale=false", workdir_root="gs://b/it's")
  steps = tpu.plan(runs, _opts(accelerator_type="v6e-8", source_git="https://h/r.git",
                               source_ref="main"))
  steps += tpu.teardown(_opts())
  for step in steps:
    assert shlex.split(step.shell) == list(step.argv)
  start = next(s for s in steps if "start" in s.comment)
  remote = start.argv[start.argv.index("--command") + 1]
  words = shlex.split(remote)
  script = words[words.index("-c") + 1]
  run_lines = [l for l in script.splitlines() if l.startswith("run_one ")]
  # The runs use the venv the install step made ($HOME expanded on the worker).
  assert [shlex.split(l) for l in run_lines] == [
      ["run_one", r.name, r.logdir, r.command, "$HOME/ldm-scaling-venv/bin/python", "-m",
       "ldm_scaling", *r.args] for r in runs]


def _executable(path, text):
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _fake_worker(tmp_path, curl=None, remote_dir="ldm-scaling"):
  """A fake TPU worker: a home with the checkout directory and, beside it, the install step's venv
  with a stub python that records its argv (NUL-separated) and the LDM_SCALING_* variables, and a
  bin directory with optionally a stub curl (the metadata server). Returns (home, bin_dir,
  argv_file, env_file)."""
  home = tmp_path / "home"
  (home / remote_dir).mkdir(parents=True)
  venv_bin = home / f"{os.path.normpath(remote_dir)}-venv" / "bin"
  venv_bin.mkdir(parents=True)
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  argv_file, env_file = tmp_path / "argv.txt", tmp_path / "env.txt"
  _executable(venv_bin / "python",
              "#!/bin/sh\nfor a in \"$@\"; do printf '%s\\0' \"$a\"; done >> "
              f"{argv_file}\nprintf '\\n' >> {argv_file}\n"
              "echo \"$LDM_SCALING_COORDINATOR $LDM_SCALING_NUM_PROCESSES $LDM_SCALING_PROCESS_ID\""
              f" >> {env_file}\necho 'ldm-scaling train: done at step 5'\n")
  if curl:
    _executable(bin_dir / "curl", curl)
  return home, bin_dir, argv_file, env_file


def _run_start_command(tmp_path, runs, accelerator_type, curl=None, **opts):
  """Runs the start step's remote command with a real bash on a fake worker (:func:`_fake_worker`);
  returns (argv lines, env lines) once every run left its marker."""
  home, bin_dir, argv_file, env_file = _fake_worker(tmp_path, curl)
  topo = topology.topology(accelerator_type)
  remote = tpu.start_command(runs, _opts(accelerator_type=accelerator_type, **opts), topo)
  env = dict(PATH=f"{bin_dir}:/usr/bin:/bin", HOME=str(home))
  subprocess.run(["bash", "-c", remote], cwd=home, env=env, check=True, timeout=20)
  markers = [os.path.join(r.logdir, "launch.done") for r in runs]
  deadline = time.time() + 20
  while not all(map(os.path.exists, markers)) and time.time() < deadline:
    time.sleep(0.05)
  assert all(map(os.path.exists, markers))
  argvs = [line.split("\0")[:-1] for line in argv_file.read_text().strip("\n").split("\n")]
  return argvs, env_file.read_text().splitlines()


def test_start_command_executes_the_runs_with_their_exact_arguments(tmp_path):
  """Quoting, nohup, per-worker logs and the finished marker, end to end in a real bash."""
  sweep = _sweep(name="q", axes=(("eval.samplers", ("dpm++", "ddim")),),
                 labels=(("eval.samplers", ""),),
                 overrides=(("train.sample_prompts", ("a \"red\" circle", "it's $HOME")),))
  runs = sweeps.expand(sweep, workdir_root=str(tmp_path / "runs"))
  argvs, _ = _run_start_command(tmp_path, runs, "v4-8")
  assert argvs == [["-m", "ldm_scaling", *r.args] for r in runs]
  assert "it's $HOME" in "".join(argvs[0])  # not expanded
  logs = os.listdir(os.path.join(runs[0].logdir, "logs"))
  assert len(logs) == 1
  with open(os.path.join(runs[0].logdir, "logs", logs[0]), encoding="utf-8") as f:
    assert "done at step 5" in f.read()


def test_tpu_marker_skips_the_same_command_and_reruns_a_changed_one(tmp_path):
  """The remote script's run_one in a real bash: a marker only counts for the command it records."""
  logdir = tmp_path / "run"
  (tmp_path / "home" / tpu.LOG_DIR).mkdir(parents=True)
  calls = tmp_path / "calls.txt"

  def run_one(*argv):
    script = (tpu._HELPERS + "\nrun_one r " + shlex.quote(str(logdir)) + " train "
              + shlex.join(["sh", "-c", f"echo \"$0\" >> {calls}; echo 'ldm-scaling train: "
                                        "done at step 5'", *argv]))
    return subprocess.run(["bash", "-c", script], env=dict(PATH="/usr/bin:/bin",
                          HOME=str(tmp_path / "home")), capture_output=True, text=True,
                          check=True, timeout=20).stdout

  run_one("steps=5")
  assert (logdir / "launch.done").exists()
  assert "finished earlier, skipped" in run_one("steps=5")
  assert "records another command" in run_one("steps=10\nwith a newline")
  assert "finished earlier, skipped" in run_one("steps=10\nwith a newline")
  assert calls.read_text().splitlines() == ["steps=5", "steps=10", "with a newline"]  # ran twice


@pytest.mark.parametrize("endpoints", ["t1v-w-0:uid0:10.1.0.5,t1v-w-1:uid1:10.1.0.6",
                                       "10.1.0.5,10.1.0.6"])
def test_multi_host_start_reads_the_coordinator_from_the_metadata_server(tmp_path, endpoints):
  # Both formats of worker-network-endpoints that JAX's GceTpuCluster accepts; this is worker 1.
  curl = ("#!/bin/sh\ncase \"$*\" in\n"
          f"  *worker-network-endpoints*) printf '%s' '{endpoints}' ;;\n"
          "  *agent-worker-number*) printf 1 ;;\n  *) exit 22 ;;\nesac\n")
  runs = _expand("configs/sweeps/model_size.py:widths=(64,)", workdir_root=str(tmp_path / "r"))
  _, env = _run_start_command(tmp_path, runs, "v4-32", curl=curl, workdir_is_shared=True)
  assert env == [f"10.1.0.5:{tpu.COORDINATOR_PORT} 2 1"]


def _metadata(endpoints="10.1.0.5,10.1.0.6", worker="1", rc=0):
  """A stub curl answering the metadata server's two keys (rc: curl's exit code, as -f gives on
  an HTTP error or a missing server)."""
  return ("#!/bin/sh\ncase \"$*\" in\n"
          f"  *worker-network-endpoints*) printf '%s' '{endpoints}' ;;\n"
          f"  *agent-worker-number*) printf '%s' '{worker}' ;;\nesac\nexit {rc}\n")


def _run_multi_host_script(tmp_path, curl, remote_dir="ldm-scaling", **env):
  """The v4-32 start script (what nohup runs) in a real bash on a fake worker, synchronously,
  with ``env`` set on the worker; returns (the finished process, the LDM_SCALING_* line the stub
  trainer saw, or None when it did not run)."""
  home, bin_dir, _, env_file = _fake_worker(tmp_path, curl, remote_dir)
  run = sweeps.Run(sweep="s", name="r", command="train", config="c.py", overrides=(),
                   workdir=str(tmp_path / "r"), logdir=str(tmp_path / "r"))
  script = tpu.remote_script([run], _opts(workdir_is_shared=True, remote_dir=remote_dir),
                             topology.topology("v4-32"))
  proc = subprocess.run(["bash", "-c", script], cwd=home, capture_output=True, text=True,
                        env=dict(PATH=f"{bin_dir}:/usr/bin:/bin", HOME=str(home), **env),
                        check=False, timeout=20)
  return proc, (env_file.read_text().strip() if env_file.exists() else None)


@pytest.mark.parametrize("curl, key, variables", [
    (_metadata(endpoints="", worker=""), "worker-network-endpoints",
     ["LDM_SCALING_COORDINATOR", "LDM_SCALING_NUM_PROCESSES"]),
    (_metadata(endpoints="", worker="", rc=22), "worker-network-endpoints",  # HTTP error
     ["LDM_SCALING_COORDINATOR", "LDM_SCALING_NUM_PROCESSES"]),
    (_metadata(endpoints="t1v-w-0:uid0:,t1v-w-1:uid1:"), "worker-network-endpoints",  # no IP
     ["LDM_SCALING_COORDINATOR", "LDM_SCALING_NUM_PROCESSES"]),
    (_metadata(worker=""), "agent-worker-number", ["LDM_SCALING_PROCESS_ID"]),
    (_metadata(worker="w1"), "agent-worker-number", ["LDM_SCALING_PROCESS_ID"]),
])
def test_multi_host_start_stops_on_an_empty_metadata_lookup(tmp_path, curl, key, variables):
  # Before: empty lookups became COORDINATOR=:8482 NUM_PROCESSES=0 and the trainer failed later.
  proc, trainer_env = _run_multi_host_script(tmp_path, curl)
  assert proc.returncode != 0 and trainer_env is None  # no run started
  lines = proc.stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith("ldm-scaling launch: "), proc.stderr
  assert f"metadata key {key}" in lines[0]
  for variable in variables:
    assert variable in lines[0] and "to override it" in lines[0]


def test_multi_host_start_uses_the_variables_set_on_the_worker(tmp_path):
  # No metadata server at all (curl fails); the three variables set on the worker are enough, and
  # a nested --remote-dir works.
  env = dict(LDM_SCALING_COORDINATOR="10.9.0.1:1234", LDM_SCALING_NUM_PROCESSES="4",
             LDM_SCALING_PROCESS_ID="3")
  proc, trainer_env = _run_multi_host_script(tmp_path, _metadata("", "", rc=7),
                                             remote_dir="work/ldm", **env)
  assert proc.returncode == 0, proc.stderr
  assert trainer_env == "10.9.0.1:1234 4 3"
  # Only the variable whose lookup is empty: the others still come from the metadata server.
  _, trainer_env = _run_multi_host_script(tmp_path / "2", _metadata(worker=""),
                                          LDM_SCALING_PROCESS_ID="0")
  assert trainer_env == f"10.1.0.5:{tpu.COORDINATOR_PORT} 2 0"


@pytest.mark.parametrize("env, message", [
    (dict(LDM_SCALING_NUM_PROCESSES="four"),
     'LDM_SCALING_NUM_PROCESSES="four" (set on the worker) is not a number'),
    (dict(LDM_SCALING_PROCESS_ID="2"), "LDM_SCALING_PROCESS_ID=2 (set on the worker) is not "
     "below LDM_SCALING_NUM_PROCESSES=2 (from metadata key worker-network-endpoints)"),
    (dict(LDM_SCALING_NUM_PROCESSES="0"), "LDM_SCALING_NUM_PROCESSES=0 (set on the worker) is "
     "below 1"),
])
def test_multi_host_start_checks_the_variables_set_on_the_worker(tmp_path, env, message):
  proc, trainer_env = _run_multi_host_script(tmp_path, _metadata(), **env)
  assert proc.returncode != 0 and trainer_env is None
  assert message in proc.stderr and len(proc.stderr.splitlines()) == 1


# The install step on a fake slice: a fake gcloud on PATH that plays the workers, each a real bash
# in its own home with stub tools on its PATH.

_FAKE_GCLOUD = r'''
"""gcloud for a fake slice whose workers' homes are $FAKE_TPU_ROOT/worker0, worker1, ...: records
each call in $FAKE_TPU_ROOT/gcloud.log (a JSON list a line). `tpu-vm create` succeeds; `tpu-vm
scp/ssh --worker=all` copy the file into / run the --command with a real bash in every worker's
home, one after another (the command also goes to the worker's ssh.log), with the worker's PATH
and FAKE_WORKER=<its number>; ssh exits 1 if any worker's command failed, as gcloud does."""
import json, os, shutil, subprocess, sys

root, args = os.environ["FAKE_TPU_ROOT"], sys.argv[1:]
with open(os.path.join(root, "gcloud.log"), "a") as f:
  f.write(json.dumps(args) + "\n")
homes = sorted(os.path.join(root, d) for d in os.listdir(root) if d.startswith("worker"))
verb = args[:4]
if verb == ["compute", "tpus", "tpu-vm", "create"]:
  sys.exit(0)
if "--worker=all" not in args:
  sys.exit("fake gcloud: only --worker=all is emulated, got %s" % args)
if verb == ["compute", "tpus", "tpu-vm", "scp"]:
  source, dest = args[4], args[5].split(":", 1)[1]
  for home in homes:
    shutil.copy(source, os.path.join(home, dest))
  sys.exit(0)
if verb == ["compute", "tpus", "tpu-vm", "ssh"]:
  command = args[args.index("--command") + 1]
  failed = False
  for i, home in enumerate(homes):
    with open(os.path.join(home, "ssh.log"), "a") as f:
      f.write(json.dumps(command) + "\n")
    env = {"HOME": home, "PATH": os.environ["FAKE_WORKER_PATH"], "FAKE_WORKER": str(i)}
    failed |= subprocess.run(["bash", "-c", command], cwd=home, env=env).returncode != 0
  sys.exit(1 if failed else 0)
sys.exit("fake gcloud: unexpected arguments %s" % args)
'''

_FAKE_TOOL = r'''
"""A worker's tool, as configured by <its path>.json: hostname, curl (the metadata server),
gcloud (`gcloud storage ls/cat/cp`, with gs://X the folder <conf gcs>/X; each cp is logged with
what it copied to ~/storage.log), or a Python -- the image's python3, python3.12, or a venv's
python made by `python3 -m uv venv`. A Python appends [its name, *argv] to ~/calls.log and
emulates what the install and the runs use: `-c CODE` (run with its own version_info),
`--version`, `-m pip install` (uv, or the package from a checkout: into its site), `-m uv` (only
once pip installed uv: `venv`, which refuses an existing directory, and `pip install --python
PY`) and `-m ldm_scaling` (only once the package is in its site: prints a step, waits until the
launcher has copied that line to a gs:// workdir's logs/<host>.log, logs cwd, the LDM_SCALING_*
and cache variables and whether it saw the copy to ~/env.log, prints the trainer's done)."""
import json, os, shutil, sys, time

exe, args = sys.argv[0], sys.argv[1:]
with open(exe + ".json") as f:
  conf = json.load(f)
home = os.environ["HOME"]
if conf["role"] == "hostname":
  print("worker-" + os.environ["FAKE_WORKER"])
  sys.exit(0)
if conf["role"] == "gcloud":
  def local(url):
    return os.path.join(conf["gcs"], url[len("gs://"):]) if url.startswith("gs://") else url
  if args[:2] == ["storage", "ls"]:
    sys.exit(0 if os.path.exists(local(args[2])) else 1)
  if args[:2] == ["storage", "cat"]:
    if not os.path.exists(local(args[2])):
      sys.exit(1)
    with open(local(args[2])) as f:
      sys.stdout.write(f.read())
    sys.exit(0)
  if args[:2] == ["storage", "cp"]:
    source, dest = local(args[2]), local(args[3])
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    shutil.copyfile(source, dest + ".part")
    os.replace(dest + ".part", dest)  # an object appears whole
    with open(dest) as f, open(os.path.join(home, "storage.log"), "a") as log:
      log.write(json.dumps([args[2], args[3], f.read()]) + "\n")
    sys.exit(0)
  sys.exit("fake gcloud on a worker: unexpected arguments %s" % args)
if conf["role"] == "curl":
  answers = {"worker-network-endpoints": conf["endpoints"],
             "agent-worker-number": os.environ["FAKE_WORKER"]}
  key = args[-1].rsplit("/", 1)[-1]
  if key not in answers:
    sys.exit(22)
  print(answers[key], end="")
  sys.exit(0)

with open(os.path.join(home, "calls.log"), "a") as f:
  f.write(json.dumps([conf.get("name") or exe, *args]) + "\n")
site = os.path.join(home, conf["site"])


def fail(message, code=1):
  print(message, file=sys.stderr)
  sys.exit(code)


def install(site, args):
  source = args[args.index("-e") + 1]
  if not os.path.exists(os.path.join(source, "setup.py")):
    fail("fake pip: %s is not a Python project" % source)
  requirements = [a for a in args[args.index("-e") + 2:]]
  with open(os.path.join(site, "installed"), "w") as f:
    json.dump([os.path.abspath(source), *requirements], f)


if args[:1] == ["-c"]:
  sys.version_info = tuple(conf["version"]) + (0, "final", 0)
  exec(args[1], {})
  sys.exit(0)
if args == ["--version"]:
  print("Python %d.%d.0" % tuple(conf["version"]))
  sys.exit(0)
if args[:3] == ["-m", "pip", "install"]:
  os.makedirs(site, exist_ok=True)
  if any(a.startswith("uv==") for a in args):
    open(os.path.join(site, "uv"), "w").close()
  else:
    install(site, args)
  sys.exit(0)
if args[:2] == ["-m", "uv"]:
  if not os.path.exists(os.path.join(site, "uv")):
    fail("%s: No module named uv" % exe)
  if args[2] == "venv":
    target, version = args[-1], args[args.index("--python") + 1]
    if os.path.exists(os.path.join(home, "uv-venv-fails")):
      fail("error: No interpreter found for Python %s in managed installations or search path"
           % version, 2)
    if os.path.exists(target):
      fail("error: %s exists; use --clear to replace it" % target, 2)
    python = os.path.join(target, "bin", "python")
    os.makedirs(os.path.dirname(python))
    shutil.copy(exe, python)
    with open(python + ".json", "w") as f:
      json.dump({"role": "python", "version": [int(v) for v in version.split(".")],
                 "site": os.path.abspath(target), "gcs": conf.get("gcs")}, f)
    sys.exit(0)
  if args[2:4] == ["pip", "install"]:
    python = args[args.index("--python") + 1]
    if not os.path.exists(python):
      fail("error: no Python at %s" % python, 2)
    with open(python + ".json") as f:
      install(json.load(f)["site"], args)
    sys.exit(0)
if args[:2] == ["-m", "ldm_scaling"]:
  if not os.path.exists(os.path.join(site, "installed")):
    fail("%s: No module named ldm_scaling" % exe)
  variables = [os.environ.get(v) for v in (
      "LDM_SCALING_COORDINATOR", "LDM_SCALING_NUM_PROCESSES", "LDM_SCALING_PROCESS_ID",
      "TFDS_DATA_DIR", "HF_HOME", "JAX_COMPILATION_CACHE_DIR")]
  print("ldm-scaling train: step 1", flush=True)
  workdir, streamed = args[args.index("--workdir") + 1], None
  if conf.get("gcs") and workdir.startswith("gs://"):
    copy = os.path.join(conf["gcs"], workdir[len("gs://"):], "logs",
                        "worker-%s.log" % os.environ["FAKE_WORKER"])
    deadline = time.time() + 30
    while not streamed and time.time() < deadline:
      time.sleep(0.05)
      streamed = os.path.exists(copy) and "step 1" in open(copy).read()
  with open(os.path.join(home, "env.log"), "a") as f:
    f.write(json.dumps([os.getcwd(), *variables, streamed]) + "\n")
  print("ldm-scaling train: done at step 5")
  sys.exit(0)
fail("fake %s: unexpected arguments %s" % (exe, args), 99)
'''

# What the install runs on a worker (the uv version and the check of python_requires).
_UV = ["python3", "-m", "pip", "install", "-q", "--user", "--no-warn-script-location",
       "uv==0.13.8"]
_CHECK = "import sys; sys.exit(sys.version_info < (3, 11))"


def _fake_slice(tmp_path, monkeypatch, workers=2):
  """A fake TPU slice: `gcloud` (_FAKE_GCLOUD) first on this process's PATH, and ``workers``
  worker homes whose PATH has the stubs of _FAKE_TOOL: python3 3.10 with pip (the TPU images'),
  python3.12, curl answering the metadata keys, hostname (worker-<i>), gcloud storage on the
  bucket ``tmp_path/gcs``. Returns the homes."""
  root, local_bin, worker_bin = tmp_path / "slice", tmp_path / "bin", tmp_path / "worker-bin"
  gcs = str(tmp_path / "gcs")  # the bucket the workers' gcloud storage reads and writes
  homes = [root / f"worker{i}" for i in range(workers)]
  for path in (local_bin, worker_bin, *homes):
    path.mkdir(parents=True)
  shebang = f"#!{sys.executable} -S\n"  # stdlib only: no site, a faster start
  _executable(local_bin / "gcloud", shebang + _FAKE_GCLOUD)
  endpoints = ",".join(f"t1v-w-{i}:uid{i}:10.0.0.{i + 1}" for i in range(workers))
  tools = {"python3": dict(role="python", name="python3", version=[3, 10], site=".local",
                           gcs=gcs),
           "python3.12": dict(role="python", name="python3.12", version=[3, 12],
                              site=".python3.12", gcs=gcs),
           "curl": dict(role="curl", endpoints=endpoints), "hostname": dict(role="hostname"),
           "gcloud": dict(role="gcloud", gcs=gcs)}
  for name, conf in tools.items():
    _executable(worker_bin / name, shebang + _FAKE_TOOL)
    (worker_bin / f"{name}.json").write_text(json.dumps(conf))
  monkeypatch.setenv("PATH", f"{local_bin}:/usr/bin:/bin")
  monkeypatch.setenv("FAKE_TPU_ROOT", str(root))
  monkeypatch.setenv("FAKE_WORKER_PATH", f"{worker_bin}:/usr/bin:/bin")
  return homes


def _source_tarball(tmp_path):
  """A source tarball as `git archive` makes it: the project's files at its top level."""
  path = tmp_path / "src.tar.gz"
  setup = tmp_path / "setup.py"
  setup.write_text("# the project\n")
  with tarfile.open(path, "w:gz") as tar:
    tar.add(setup, arcname="setup.py")
  return str(path)


def _json_lines(path):
  return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


def _wait_for(path, text, seconds=20):
  deadline = time.time() + seconds
  while not (path.exists() and text in path.read_text()) and time.time() < deadline:
    time.sleep(0.05)
  assert path.exists() and text in path.read_text(), path


def _slice_opts(tmp_path, **kw):
  return _opts(jax_spec="jax[tpu]==0.10.2", source_tarball=_source_tarball(tmp_path), **kw)


def test_tpu_launch_on_a_fake_slice_installs_python_3_11_with_uv_and_runs_with_it(
    tmp_path, monkeypatch):
  """The whole launch, tpu.execute of the plan, against a fake gcloud and two workers whose
  python3 is 3.10 as on the TPU images: each installs uv, makes a Python 3.11 venv, installs the
  package into it and trains with the venv's python."""
  homes = _fake_slice(tmp_path, monkeypatch, workers=2)
  runs = _expand("configs/sweeps/model_size.py:widths=(64,)", workdir_root="gs://bucket/r")
  cache = tpu.default_compilation_cache(runs, "gs://bucket/r")
  env = (("TFDS_DATA_DIR", "gs://bucket/tfds"), ("HF_HOME", "~/hf"))
  steps = tpu.plan(runs, _slice_opts(tmp_path, accelerator_type="v6e-16", env=env,
                                     compilation_cache=cache, log_every=1))
  tpu.execute(steps, log=lambda _: None)
  for home in homes:
    _wait_for(home / tpu.LOG_DIR / "model_size.log", "all runs ended")

  calls = _json_lines(tmp_path / "slice" / "gcloud.log")
  assert [c[:4] for c in calls] == [["compute", "tpus", "tpu-vm", verb]
                                    for verb in ("create", "scp", "ssh", "ssh")]
  assert calls == [list(s.argv[1:]) for s in steps]  # gcloud got the plan, in order
  commands = [c[c.index("--command") + 1] for c in calls[2:]]  # install, start
  for i, home in enumerate(homes):
    assert _json_lines(home / "ssh.log") == commands  # every worker ran both
    assert _json_lines(home / "calls.log") == [
        _UV,
        ["python3", "-m", "uv", "venv", "-q", "--python", "3.11", "ldm-scaling-venv"],
        ["python3", "-m", "uv", "pip", "install", "-q", "--python",
         "ldm-scaling-venv/bin/python", "-e", "ldm-scaling", "jax[tpu]==0.10.2"],
        [f"{home}/ldm-scaling-venv/bin/python", "-m", "ldm_scaling", *runs[0].args]]
    assert json.loads((home / "ldm-scaling-venv" / "installed").read_text()) == [
        f"{home}/ldm-scaling", "jax[tpu]==0.10.2"]
    # The run: in the checkout, as process i of 2 with worker 0 as the coordinator, with the
    # --env variables (~/ is the worker's home) and the compilation cache on the bucket; its log
    # reached the bucket while it ran (the run saw its first line there before finishing).
    assert _json_lines(home / "env.log") == [
        [f"{home}/ldm-scaling", f"10.0.0.1:{tpu.COORDINATOR_PORT}", "2", str(i),
         "gs://bucket/tfds", f"{home}/hf", "gs://bucket/r/jax_cache", True]]
    log_copies = [c for c in _json_lines(home / "storage.log") if c[1].endswith(".log")]
    assert {c[:2] for c in map(tuple, log_copies)} == {
        (f"{home}/{tpu.LOG_DIR}/w64.log", f"{runs[0].logdir}/logs/worker-{i}.log")}
    assert "step 1" in log_copies[0][2] and "done at step" not in log_copies[0][2]  # streamed
    assert log_copies[-1][2].endswith("ldm-scaling train: done at step 5\n")  # the final copy
  bucket = tmp_path / "gcs" / runs[0].logdir[len("gs://"):]
  assert sorted(os.listdir(bucket / "logs")) == ["worker-0.log", "worker-1.log"]
  assert (bucket / "launch.done").exists()
  assert cache == "gs://bucket/r/jax_cache"


def test_tpu_install_rerun_reuses_the_venv_and_replaces_an_old_one(tmp_path, monkeypatch):
  (home,) = _fake_slice(tmp_path, monkeypatch, workers=1)
  install = tpu.install_steps(_slice_opts(tmp_path, accelerator_type="v4-8"), "t")
  venv_python = home / "ldm-scaling-venv" / "bin" / "python"
  tpu.execute(install, log=lambda _: None)
  assert venv_python.exists()
  uv_install = ["python3", "-m", "uv", "pip", "install", "-q", "--python",
                "ldm-scaling-venv/bin/python", "-e", "ldm-scaling", "jax[tpu]==0.10.2"]
  check = ["ldm-scaling-venv/bin/python", "-c", _CHECK]
  (home / "calls.log").unlink()
  tpu.execute(install, log=lambda _: None)
  assert _json_lines(home / "calls.log") == [_UV, check, uv_install]  # no new venv
  # A venv of an older Python is replaced (the fake uv refuses to create over a directory).
  conf = json.loads((home / "ldm-scaling-venv" / "bin" / "python.json").read_text())
  (home / "ldm-scaling-venv" / "bin" / "python.json").write_text(
      json.dumps(dict(conf, version=[3, 10])))
  (home / "calls.log").unlink()
  tpu.execute(install, log=lambda _: None)
  assert _json_lines(home / "calls.log") == [
      _UV, check, ["python3", "-m", "uv", "venv", "-q", "--python", "3.11", "ldm-scaling-venv"],
      uv_install]
  assert json.loads(venv_python.with_suffix(".json").read_text())["version"] == [3, 11]


def test_tpu_install_failure_stops_the_launch_with_one_line(tmp_path, monkeypatch, capfd):
  """uv cannot make the venv on worker 1: its install stops there with one line, gcloud exits 1
  and the launch stops before the start step; worker 0's install went through."""
  homes = _fake_slice(tmp_path, monkeypatch, workers=2)
  (homes[1] / "uv-venv-fails").touch()
  runs = _expand("configs/sweeps/model_size.py:widths=(64,)", workdir_root="gs://b/r")
  steps = tpu.plan(runs, _slice_opts(tmp_path, accelerator_type="v6e-16", skip_create=True))
  with pytest.raises(tpu.LaunchError, match="step failed with exit code 1: gcloud compute tpus "
                     "tpu-vm ssh"):
    tpu.execute(steps, log=lambda _: None)
  err = capfd.readouterr().err.splitlines()
  assert err == [
      "error: No interpreter found for Python 3.11 in managed installations or search path",
      "ldm-scaling install on worker-1: uv could not create a Python 3.11 environment in "
      "~/ldm-scaling-venv (it downloads CPython when the image has none): check that the "
      "worker reaches the internet, or give --remote-python, a Python >= 3.11"]
  assert [c[3] for c in _json_lines(tmp_path / "slice" / "gcloud.log")] == ["scp", "ssh"]
  assert _json_lines(homes[0] / "calls.log")[-1][3:5] == ["pip", "install"]
  assert _json_lines(homes[1] / "calls.log")[-1][3] == "venv"  # nothing after it
  assert not any((h / tpu.LOG_DIR).exists() for h in homes)  # no run started


def test_tpu_install_with_remote_python_skips_uv_and_refuses_an_old_python(
    tmp_path, monkeypatch, capfd):
  (home,) = _fake_slice(tmp_path, monkeypatch, workers=1)
  runs = _expand("configs/sweeps/model_size.py:widths=(64,)", workdir_root=str(tmp_path / "r"))
  steps = tpu.plan(runs, _slice_opts(tmp_path, accelerator_type="v4-8", python="python3.12"))
  tpu.execute(steps, log=lambda _: None)
  _wait_for(home / tpu.LOG_DIR / "model_size.log", "all runs ended")
  assert _json_lines(home / "calls.log") == [
      ["python3.12", "-c", _CHECK],
      ["python3.12", "-m", "pip", "install", "-q", "-e", "ldm-scaling", "jax[tpu]==0.10.2"],
      ["python3.12", "-m", "ldm_scaling", *runs[0].args]]
  assert not (home / "ldm-scaling-venv").exists()
  # The image's python3 (3.10) and a Python the worker lacks are refused before installing.
  for python, version in (("python3", "Python 3.10.0"), ("python3.13", "not found")):
    (home / "calls.log").unlink()
    install = tpu.install_steps(_slice_opts(tmp_path, accelerator_type="v4-8", python=python),
                                "t")
    with pytest.raises(tpu.LaunchError, match="step failed with exit code 1"):
      tpu.execute(install, log=lambda _: None)
    assert capfd.readouterr().err.splitlines() == [
        f"ldm-scaling install on worker-0: --remote-python {python} ({version}) is not a Python "
        ">= 3.11, which jax, flax, orbax and grain need: give one that is, or leave "
        "--remote-python out to install Python 3.11 with uv"]
    assert all(c[1:3] != ["-m", "pip"] for c in _json_lines(home / "calls.log"))


def test_setup_python_requires_is_the_workers_python():
  with open(os.path.join(REPO, "setup.py"), encoding="utf-8") as f:
    requires = re.search(r'python_requires=">=([\d.]+)"', f.read()).group(1)
  assert requires == tpu.PYTHON_VERSION == "3.11"


# The memory check (--plan) has its own tests below; these test everything else.
_TPU_ARGS = ["--tpu-name", "t", "--zone", "z", "--accelerator-type", "v4-8", "--source-tarball",
             "x.tgz", "--dry-run", "--plan", "off"]
_EXPERIMENT = ["--config", "configs/t2i.py", "--workdir", "gs://b/w"]


@pytest.mark.parametrize("args, named", [
    (_EXPERIMENT + ["--config.train.steps=5\n6"], "override '--config.train.steps=5\\n6'"),
    (["--config", "configs/t2i.py", "--workdir", "gs://b/w\nrm -rf ~"], "workdir"),
    (_EXPERIMENT + ["--zone", "z\tz"], "--zone 'z\\tz'"),
    (_EXPERIMENT + ["--tpu-name", "t\x1b[2J"], "--tpu-name 't\\x1b[2J'"),
    (_EXPERIMENT + ["--remote-python", "python3\r"], "--remote-python"),
    (_EXPERIMENT + ["--project", "p\x7f"], "--project"),
    (["--config", "configs/sweeps/model_size.py:widths=(64,)", "--bucket", "gs://b",
      '--config.train.sample_prompts=("a\nb",)'], "run 'w64': override"),
    (["--teardown", "--project", "p\nq"], "--project"),
])
def test_tpu_launcher_refuses_control_characters(args, named, capsys, monkeypatch):
  monkeypatch.setenv("PATH", "/nonexistent")
  assert commands.main(_TPU_ARGS + args, launcher="tpu", prog="p") == 2
  err = capsys.readouterr().err
  assert err.startswith("p: error: ") and len(err.splitlines()) == 1
  assert named in err and "control character" in err and "remove it" in err


def test_env_flags_and_the_compilation_cache_default(monkeypatch, capsys):
  """--env NAME=VALUE / NAME (this shell's value) reach the start script in order; the cache is
  <gs:// root>/jax_cache by default, given or 'none' with --compilation-cache; bad ones refused."""
  monkeypatch.setenv("PATH", "/nonexistent")
  monkeypatch.setenv("HF_HOME", "/mnt/hf")
  monkeypatch.delenv("TFDS_DATA_DIR", raising=False)

  def script(*extra):
    assert commands.main(_TPU_ARGS + _EXPERIMENT + list(extra), launcher="tpu", prog="p") == 0
    out = capsys.readouterr().out
    return [l for l in out.splitlines() if l.startswith(("export ", "log_every="))]

  assert script("--env", "A=x y", "--env", "HF_HOME") == [
      'export A="x y"', "export HF_HOME=/mnt/hf",
      "export JAX_COMPILATION_CACHE_DIR=gs://b/ldm-scaling/jax_cache", "log_every=60"]
  assert script("--compilation-cache", "none", "--log-every", "5") == ["log_every=5"]
  assert script("--env", "JAX_COMPILATION_CACHE_DIR=/c") == [
      "export JAX_COMPILATION_CACHE_DIR=/c", "log_every=60"]
  assert script("--workdir-root", "gs://b/root", "--compilation-cache", "gs://c/j")[0] == (
      "export JAX_COMPILATION_CACHE_DIR=gs://c/j")
  for extra, message in [(["--env", "TFDS_DATA_DIR"], "TFDS_DATA_DIR is not set here"),
                         (["--env", "1X=a"], "is not a variable name"),
                         (["--env", "A=1", "--env", "A=2"], "given twice"),
                         (["--env", "JAX_COMPILATION_CACHE_DIR=/c", "--compilation-cache", "/d"],
                          "both set the compilation cache"),
                         (["--log-every", "0"], "--log-every must be >= 1")]:
    assert commands.main(_TPU_ARGS + _EXPERIMENT + extra, launcher="tpu", prog="p") == 2
    err = capsys.readouterr().err
    assert message in err and len(err.splitlines()) == 1
  # Without any gs:// workdir there is no bucket to put the cache on.
  runs = [sweeps.Run(sweep="s", name="r", command="train", config="c.py", overrides=(),
                     workdir="/tmp/r", logdir="/tmp/r")]
  assert tpu.default_compilation_cache(runs) == ""


def test_plan_refuses_control_characters_in_runs_and_options():
  run = sweeps.Run(sweep="s", name="r", command="train", config="configs/t2i.py",
                   overrides=("train.sample_prompts=('a\nb',)",), workdir="gs://b/r",
                   logdir="gs://b/r")
  with pytest.raises(ConfigError, match="run 'r': override .*control character '\\\\n'"):
    tpu.plan([run], _opts())
  ok = dataclasses.replace(run, overrides=())
  with pytest.raises(ConfigError, match="--jax-spec 'jax\\[tpu\\]\\\\x00'"):
    tpu.plan([ok], _opts(jax_spec="jax[tpu]\0"))
  with pytest.raises(ConfigError, match="run name 'r\\\\n'"):
    tpu.plan([dataclasses.replace(ok, name="r\n")], _opts())
  assert tpu.plan([ok], _opts(source_git="https://h/r.git"))  # plain text passes


@pytest.mark.parametrize("remote_dir, why", [
    ("/abs", "is not relative"), ("/", "is not relative"), ("~/ldm", "is not relative"),
    ("a/../b", "has a '..' component"), ("..", "has a '..' component"),
    ("../ldm", "has a '..' component"), (".", "names the home directory"),
    ("", "names the home directory"), ("./", "names the home directory"),
])
def test_remote_dir_must_stay_under_the_home_directory(remote_dir, why, capsys, monkeypatch):
  # The install step runs `rm -rf REMOTE_DIR` on every worker.
  with pytest.raises(ConfigError, match=f"--remote-dir .*{why}.*relative to the home directory"):
    tpu.plan([], _opts(remote_dir=remote_dir))
  monkeypatch.setenv("PATH", "/nonexistent")
  assert commands.main(_TPU_ARGS + _EXPERIMENT + ["--remote-dir", remote_dir], launcher="tpu",
                       prog="p") == 2
  assert why in capsys.readouterr().err


def test_a_relative_remote_dir_is_used_by_install_and_start(capsys, monkeypatch):
  monkeypatch.setenv("PATH", "/nonexistent")
  assert commands.main(_TPU_ARGS + _EXPERIMENT + ["--remote-dir", "work/ldm-2"], launcher="tpu",
                       prog="p") == 0
  out = capsys.readouterr().out
  assert "rm -rf work/ldm-2 && mkdir -p work/ldm-2 && tar -xzf" in out
  assert "make_venv work/ldm-2-venv\n" in out  # beside the checkout, which each install deletes
  assert "pip install -q --python work/ldm-2-venv/bin/python -e work/ldm-2 " in out
  assert "cd work/ldm-2 || exit 1" in out
  assert '"$HOME"/work/ldm-2-venv/bin/python -m ldm_scaling train' in out


def test_topology_presets_match_the_cloud_tpu_tables():
  # (chips, hosts, runtime) as in the Cloud TPU docs: v4/v5p names count 2 cores per chip and
  # have 4 chips per host; v5e/v6e have 8 chips per host.
  expected = {
      "v4-8": (4, 1, "tpu-ubuntu2204-base"), "v4-32": (16, 4, "tpu-ubuntu2204-base"),
      "v5litepod-8": (8, 1, "v2-alpha-tpuv5-lite"), "v5litepod-16": (16, 2, "v2-alpha-tpuv5-lite"),
      "v5litepod-256": (256, 32, "v2-alpha-tpuv5-lite"), "v5p-8": (4, 1, "v2-alpha-tpuv5"),
      "v5p-32": (16, 4, "v2-alpha-tpuv5"), "v6e-8": (8, 1, "v2-alpha-tpuv6e"),
      "v6e-16": (16, 2, "v2-alpha-tpuv6e")}
  got = {t.accelerator_type: (t.chips, t.hosts, t.runtime_version) for t in topology.presets()}
  assert got == expected
  with pytest.raises(ConfigError, match="unknown TPU accelerator type"):
    topology.topology("v9-8")


def test_default_mesh_shards_only_models_that_need_it():
  v4 = topology.topology("v4-32")
  # 4.9B (paper: 5e9) x 20 B = 100 GB of state; half of 32 GiB per chip -> >= 5.8 chips -> 8.
  assert topology.default_mesh(v4, 5e9) == dict(data=-1, fsdp=8, tensor=1)
  assert topology.default_mesh(v4, 39e6) == dict(data=-1, fsdp=1, tensor=1)
  # v5p: 95 GiB per chip -> 100e9 / (47.5 * 2**30) = 1.96 -> 2.
  assert topology.default_mesh(topology.topology("v5p-8"), 5e9)["fsdp"] == 2
  with pytest.raises(ConfigError, match="use a larger slice"):
    topology.default_mesh(topology.topology("v4-8"), 5e9)


# -------------------------------------------------------------------------------------------------
# Local launcher.


def _stub_python(tmp_path):
  """A stand-in for `python -m ldm_scaling`: behaves by the run's workdir name."""
  stub = tmp_path / "python"
  stub.write_text(
      "#!/bin/sh\necho \"args: $*\"\n"
      "case \"$*\" in\n"
      "  *fail*) echo boom; exit 3 ;;\n"
      "  *preempt*) echo 'ldm-scaling train: preempted at step 2'; exit 0 ;;\n"
      "  *) echo 'ldm-scaling train: done at step 5'; exit 0 ;;\nesac\n")
  stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
  return str(stub)


def test_local_launcher_logs_marks_skips_and_reports(tmp_path):
  runs = [sweeps.Run(sweep="s", name=n, command="train", config="c.py", overrides=("a.b=1",),
                     workdir=str(tmp_path / n), logdir=str(tmp_path / n))
          for n in ("ok", "fail", "preempt")]
  python = _stub_python(tmp_path)
  outcomes = local.run_all(runs, parallel=2, python=python, log=lambda _: None)
  assert [o.status for o in outcomes] == ["done", "failed", "incomplete"]
  assert outcomes[1].returncode == 3
  log = (tmp_path / "ok" / "launch.log").read_text()
  assert runs[0].shell in log and f"args: -m ldm_scaling {shlex.join(runs[0].args)}" in log
  assert [os.path.exists(tmp_path / n / "launch.done") for n in ("ok", "fail", "preempt")] == [
      True, False, False]
  again = local.run_all(runs, python=python, log=lambda _: None)
  assert [o.status for o in again] == ["skipped", "failed", "incomplete"]
  forced = local.run_all(runs, python=python, force=True, log=lambda _: None)
  assert forced[0].status == "done"
  assert (tmp_path / "ok" / "launch.log").read_text().count("=====") == 2
  # The marker records the command: other overrides (more steps, say) run again, then skip.
  longer = dataclasses.replace(runs[0], overrides=("a.b=2",))
  said = []
  assert local.run_all([longer], python=python, log=said.append)[0].status == "done"
  assert any(l.startswith("[rerun] ok:") and runs[0].shell in l for l in said)
  assert local.run_all([longer], python=python, log=lambda _: None)[0].status == "skipped"
  assert local.run_all(runs[:1], python=python, log=lambda _: None)[0].status == "done"
  assert "1 done, 1 incomplete, 1 failed" in local.summary(outcomes)


def test_local_launcher_passes_env_to_the_runs(tmp_path, monkeypatch):
  stub = tmp_path / "python"
  _executable(stub, "#!/bin/sh\necho \"env: $TFDS_DATA_DIR $JAX_COMPILATION_CACHE_DIR\"\n"
              "echo 'ldm-scaling train: done at step 5'\n")
  monkeypatch.setenv("TFDS_DATA_DIR", "/data/tfds")
  args = ["--config", "configs/t2i.py:width=64", "--workdir", str(tmp_path / "w"),
          "--no-validate", "--env", "TFDS_DATA_DIR", "--compilation-cache", str(tmp_path / "jc")]
  # The runs' interpreter is run_all's python argument (default: this one): the stub instead.
  real = local.run_all
  monkeypatch.setattr(local, "run_all", lambda *a, **kw: real(*a, **dict(kw, python=str(stub))))
  assert commands.main(args, launcher="local", prog="p") == 0
  log = (tmp_path / "w" / "launch.log").read_text()
  assert f"env: /data/tfds {tmp_path / 'jc'}" in log


def test_local_launcher_puts_logs_of_remote_workdirs_under_log_root(tmp_path):
  run = sweeps.Run(sweep="s", name="r", command="train", config="c.py", overrides=(),
                   workdir="gs://b/s/r", logdir="gs://b/s/r")
  outcome = local.run_one(run, log_root=str(tmp_path), python=_stub_python(tmp_path))
  assert outcome.status == "done" and outcome.log == str(tmp_path / "s" / "r" / "launch.log")


@pytest.mark.slow
def test_the_launcher_plans_each_train_run_records_it_and_refuses_what_does_not_fit():
  """--plan estimate (the default): a train run that fits has its estimate written to
  <workdir>/plan.json by the start script; one that does not is refused before any step exists,
  with its need against the chip's HBM."""
  from ldm_scaling.launch import estimate as est  # pylint: disable=g-import-not-at-top
  opts = _opts(accelerator_type="v5litepod-8", plan="estimate")
  fits = [sweeps.single_run("configs/cpu_t2i.py:width=32", ["train.batch_size=64"],
                            "gs://b/w64")]
  steps = tpu.plan(fits, opts)
  (start,) = [s for s in steps if s.comment.startswith("start ")]
  words = shlex.split(start.argv[start.argv.index("--command") + 1])
  script = words[words.index("-c") + 1]  # nohup bash -c SCRIPT
  (line,) = [l for l in script.splitlines() if l.startswith("printf ")]
  words = shlex.split(line)
  recorded = json.loads(words[2])
  assert words[-1] == "gs://b/w64/plan.json" and words[-2].endswith("/w64.plan.json")
  config = experiment.load("configs/cpu_t2i.py:width=32", ["train.batch_size=64"])
  want = est.estimate(config, "v5litepod-8").to_json()
  assert recorded == dict(want, method="estimate") and recorded["fits"]
  assert recorded["bytes_per_device"] < 16 * 2**30 == recorded["hbm_bytes_per_device"]

  huge = ["train.batch_size=1048576"]  # 131,072 examples per chip
  with pytest.raises(tpu.LaunchError) as e:
    tpu.plan([sweeps.single_run("configs/cpu_t2i.py:width=32", huge, "gs://b/w64")], opts)
  message = str(e.value)
  assert "run w64 does not fit on v5litepod-8: it needs" in message
  assert "the chip has 16 GiB of HBM" in message and "nothing was created" in message
  assert "no mesh, remat, attention kernel or dtype fits by the estimate" in message
  # The estimate models the denoising UNet: a distillation run is left to --plan compile (its
  # teacher may be an earlier run of the same sweep), not refused.
  student = sweeps.single_run("configs/cpu_t2i.py:width=32", [
      "objective.name=consistency", "objective.teacher=gs://b/teacher"], "gs://b/cd")
  logged = []
  assert tpu.plan_runs([student], opts, logged.append) == {}
  assert "not planned" in logged[0] and "--plan compile" in logged[0]
  need = float(re.search(r"needs ([\d.]+) GiB", message).group(1))
  config = experiment.load("configs/cpu_t2i.py:width=32", huge)
  assert need == pytest.approx(est.estimate(config, "v5litepod-8").bytes_per_device / 2**30,
                               abs=0.06)
