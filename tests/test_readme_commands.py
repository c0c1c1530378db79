"""The README's commands stay true: its gin compositions parse and its CLI lines parse.

Nothing is run (the checkpoints are on GCS): each `python -m phatgoose_jax.{train,eval}` command of
README.md is split into its flags, and gin parses the files and bindings in that order with the
entry point's configurables registered; each `phatgoose-jax` line goes through the CLI's parser.
"""
import pathlib
import re
import shlex

import gin
import pytest

import phatgoose_jax.eval  # noqa: F401  (registers the configurables of the entry points)
import phatgoose_jax.train  # noqa: F401
from phatgoose_jax import cli, gin_utils

README = pathlib.Path(__file__).parent.parent / "README.md"


def _commands(prefix: str):
  text = README.read_text().replace("\\\n", " ")
  blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
  lines = [l.strip() for b in blocks for l in b.splitlines()]
  return [shlex.split(l.split("#")[0]) for l in lines if l.startswith(prefix)]


@pytest.fixture(autouse=True)
def _clear_gin():
  gin.clear_config()
  yield
  gin.clear_config()


@pytest.mark.parametrize("module", ["phatgoose_jax.train", "phatgoose_jax.eval"])
def test_readme_gin_commands_parse(module):
  commands = _commands(f"python -m {module}")
  assert commands, f"README has no {module} command"
  for argv in commands:
    gin.clear_config()
    files, bindings, paths, rest = gin_utils.split_flags(argv[3:])
    assert not rest, rest
    gin_utils.parse_gin(files, bindings, paths, finalize=False)
    assert gin.query_parameter("%INITIAL_CHECKPOINT_PATH").startswith("gs://t5-data/")
    assert gin.query_parameter("%P3_DIR") == "/data/P3"
    if module.endswith("train"):
      assert gin.query_parameter("%MIXTURE_OR_TASK_NAME") == "p3_ag_news"
      assert gin.query_parameter("phatgoose_jax.train.train.mode") in ("lora", "gated_lora")
    else:
      assert gin.query_parameter("%MIXTURE_OR_TASK_NAME") == "t0_heldout"
      assert gin.query_parameter("AdapterConfig.router") == "phatgoose"


def test_readme_cli_lines_parse():
  commands = _commands("phatgoose-jax ")
  assert {c[1] for c in commands} >= {"library", "demo"}
  parser = cli.build_parser()
  for argv in commands:
    parser.parse_args(argv[1:])
