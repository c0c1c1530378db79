"""Every module that declares gin configurables is imported before a config is finalized, so a
lazy import later (the P3 / FLAN / BIG-bench readers import `data.sources` when they first read)
cannot hit gin's "add a new configurable after the config was locked"."""
import pathlib
import subprocess
import sys

from phatgoose_jax import gin_utils

PKG = pathlib.Path(__file__).parent.parent / "phatgoose_jax"
ENTRY_POINTS = {"phatgoose_jax.train", "phatgoose_jax.eval"}  # run as __main__


def test_the_list_names_every_module_with_configurables():
  found = set()
  for path in PKG.rglob("*.py"):
    text = path.read_text()
    if "@gin.configurable" in text or "gin.external_configurable(" in text:
      rel = path.relative_to(PKG.parent).with_suffix("")
      found.add(".".join(rel.parts))
  assert found - ENTRY_POINTS == set(gin_utils.CONFIGURABLE_MODULES)


def test_finalized_training_config_then_reading_p3_jsonl_rows(tmp_path):
  """The reader's lazy `data.sources` import after `parse_gin(finalize=True)` (was a crash)."""
  code = (
      "import json, pathlib, sys\n"
      "import phatgoose_jax.train  # noqa: F401 (the train configurable, as the CLI)\n"
      "from phatgoose_jax import gin_utils\n"
      "gin_utils.parse_gin(['runs/train_expert.gin', 'models/tiny.gin'],\n"
      "                    ['MODEL_DIR=\"/tmp/x\"', 'MIXTURE_OR_TASK_NAME=\"t\"',\n"
      "                     'INITIAL_CHECKPOINT_PATH=\"/tmp/c\"'])\n"
      "from phatgoose_jax.data import p3_tasks\n"
      f"d = pathlib.Path({str(tmp_path)!r}) / 'p3' / 'cfg'\n"
      "d.mkdir(parents=True)\n"
      "(d / 'train.jsonl').write_text(json.dumps({'inputs_pretokenized': 'a', "
      "'targets_pretokenized': 'b', 'answer_choices': []}) + '\\n')\n"
      f"reader = p3_tasks.make_reader('jsonl', {str(tmp_path)!r}, None)\n"
      "print('ROWS', len(list(reader.rows('cfg', 'train'))))\n")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=300, cwd=str(PKG.parent))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "ROWS 1" in proc.stdout
