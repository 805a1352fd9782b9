"""Config system: typed config strings, overrides, unknown keys and wrong types rejected."""

import os
import textwrap

import pytest

from ldm_scaling import config as cfglib
from ldm_scaling import experiment
from ldm_scaling.errors import ConfigError

T2I = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "t2i.py")


def test_parse_arg_types_and_bare_flags():
  arg = cfglib.parse_arg("width=128, lr=3e-4,runlocal,name=x,mult=(1,2)",
                         width=320, lr=1e-4, runlocal=False, name="a", mult=(1,))
  assert arg.width == 128 and isinstance(arg.width, int)
  assert arg.lr == pytest.approx(3e-4)
  assert arg.runlocal is True
  assert arg.name == "x"
  assert arg.mult == (1, 2)
  assert cfglib.parse_arg(None, width=320).width == 320
  names = cfglib.parse_arg("objectives=(consistency,scale_wise),samplers=('dpm++',)",
                           objectives=("consistency",), samplers=("ddim",))
  assert names.objectives == ("consistency", "scale_wise") and names.samplers == ("dpm++",)
  with pytest.raises(ConfigError, match="expected a tuple"):
    cfglib.parse_arg("mult=(a,b)", mult=(1,))


@pytest.mark.parametrize("arg,match", [
    ("widht=3", "unknown config argument 'widht'"),
    ("width=abc", "expected an integer"),
    ("width", "needs a value"),
    ("runlocal=maybe", "expected a boolean"),
])
def test_parse_arg_errors(arg, match):
  with pytest.raises(ConfigError, match=match):
    cfglib.parse_arg(arg, width=320, runlocal=False)


def test_load_preset_string_and_overrides():
  config = experiment.load(f"{T2I}:width=128,steps=1000",
                       ["train.lr=2e-4", "--config.model.dropout=0.1", "config.mesh.fsdp=2"])
  assert config.model.width == 128 and config.model.num_heads == 0 and config.model.head_dim == 64
  assert config.train.steps == 1000
  assert config.train.lr == pytest.approx(2e-4)
  assert config.model.dropout == pytest.approx(0.1)
  assert config.mesh.fsdp == 2
  # Widths 64-wide heads do not divide get SD-1.5's fixed 8 heads.
  assert experiment.load(f"{T2I}:width=224").model.num_heads == 8
  # Loaded configs are locked: a typo is an error, not a new key.
  with pytest.raises(AttributeError):
    config.model.widht = 3


@pytest.mark.parametrize("override,match", [
    ("model.bogus=1", "unknown config key 'model.bogus'"),
    ("nosuchsection.x=1", "unknown config key 'nosuchsection.x'"),
    ("model.width=abc", "invalid literal for int"),
    ("model.remat=sometimes", "model.remat must be 'none' or 'block'"),
    ("train.steps=-5", "train.steps must be >= 1, got -5"),
    ("model.width=100", "not divisible by model.norm_groups=32"),
    ("model.width=96", "not a multiple of model.head_dim=64; set model.num_heads=8"),
])
def test_load_rejects_bad_overrides(override, match):
  with pytest.raises(ConfigError, match=match):
    experiment.load(f"{T2I}:width=128", [override])


def test_config_file_adding_a_key_is_rejected(tmp_path):
  path = tmp_path / "bad.py"
  path.write_text(textwrap.dedent("""
      from ldm_scaling import config as cfglib
      def get_config(arg=None):
        c = cfglib.base_config()
        c.model.widht = 128
        return c
  """))
  with pytest.raises(ConfigError, match="unknown config key 'model.widht'; keys in 'model'"):
    experiment.load(str(path))


def test_config_file_wrong_type_is_rejected(tmp_path):
  # ConfigDict itself refuses a str where the schema has an int.
  path = tmp_path / "bad.py"
  path.write_text("from ldm_scaling import config as c\n"
                  "def get_config(arg=None):\n  x = c.base_config()\n  x.train.steps = 'many'\n"
                  "  return x\n")
  with pytest.raises(ConfigError, match="many"):
    experiment.load(str(path))


def test_missing_config_file():
  with pytest.raises(ConfigError, match="not found"):
    experiment.load("configs/does_not_exist.py:width=3")


def test_config_hash_is_stable_and_sensitive():
  a = experiment.load(T2I)
  b = experiment.load(T2I)
  c = experiment.load(T2I, ["train.lr=0.5"])
  assert cfglib.config_hash(a) == cfglib.config_hash(b)
  assert cfglib.config_hash(a) != cfglib.config_hash(c)
  assert len(cfglib.config_hash(a)) == 12
