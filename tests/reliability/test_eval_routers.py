"""`python -m phatgoose_jax.eval` with the router files that read no library vectors
(uniform_merge.gin, single_expert.gin) runs to the end (the routed sites' gates were missing:
Flax ScopeVariableNotFoundError), and a one-expert uniform route equals that expert alone."""
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def _eval(world, out, *extra, devices=1):
  argv = ["-m", "phatgoose_jax.eval", "--gin_file=runs/eval.gin", *extra,
          f"--gin.INITIAL_CHECKPOINT_PATH='{world['base_hf']}'",
          "--gin.MIXTURE_OR_TASK_NAME='rel_tiny'", "--gin.MIXTURE_OR_TASK_MODULE='rel_tasks'",
          f"--gin.EVAL_OUTPUT_DIR='{out}'", f"--gin.LIBRARY_PATH='{world['library']}'",
          "--gin.TASK_FEATURE_LENGTHS={'inputs': 8, 'targets': 6}", "--gin.BATCH_SIZE=2"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             PYTHONPATH=os.pathsep.join([REPO, world["task_module_dir"]]),
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  proc = subprocess.run([sys.executable] + argv, env=env, capture_output=True, text=True,
                        timeout=600, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(out, "results.json")) as f:
    return json.load(f)


def test_uniform_and_single_expert_router_files_run(world, tmp_path):
  merged = _eval(world, tmp_path / "merge", "--gin_file=routers/uniform_merge.gin")
  single = _eval(world, tmp_path / "single", "--gin_file=routers/single_expert.gin",
                 "--gin.EXPERT_NAME='task_a'")
  assert merged["methods"] == ["uniform_merge"] and single["methods"] == ["single_expert"]
  # the one-expert library routed with k=1 phatgoose gates applies the same expert (weight
  # 1 / (1 + 1e-6)): the same predictions
  routed = _eval(world, tmp_path / "routed", "--gin_file=routers/phatgoose.gin",
                 "--gin.phatgoose_jax.eval.evaluate.experts=['task_a']",
                 "--gin.AdapterConfig.top_k=1")
  assert single["rows"][0]["metrics"] == pytest.approx(routed["rows"][0]["metrics"])


def test_eval_on_eight_devices_with_model_parallelism_matches_one(world, tmp_path):
  """The eval entry point on a 4 x 2 mesh (NUM_PARTITIONS=2): same results as one device."""
  one = _eval(world, tmp_path / "one", "--gin_file=routers/phatgoose.gin")
  eight = _eval(world, tmp_path / "eight", "--gin_file=routers/phatgoose.gin",
                "--gin.NUM_PARTITIONS=2", devices=8)
  assert eight["rows"][0]["metrics"] == pytest.approx(one["rows"][0]["metrics"])


def test_average_activation_vectors_from_the_cli_then_eval(world, tmp_path):
  """`library vectors LIB average_activation` (runs/average_activation.gin) stores the
  prototypes of each expert's task data, equal to `compute_average_activation_vectors` on the
  same batches; routers/average_activation.gin then evaluates with them."""
  from phatgoose_jax.library import ExpertLibrary  # pylint: disable=g-import-not-at-top
  lib = str(tmp_path / "lib")
  code = (
      "import sys\n"
      "from phatgoose_jax import cli\n"
      f"lib = {lib!r}\n"
      f"assert cli.main(['library', 'create', lib, '--base', {world['base_hf']!r}]) == 0\n"
      f"for name, src in (('a', {world['peft_a']!r}), ('b', {world['peft_b']!r})):\n"
      "  assert cli.main(['library', 'add', lib, name, '--peft', src, '--task', 'rel_tiny']) == 0\n"
      "sys.exit(cli.main(['library', 'vectors', lib, 'average_activation',\n"
      "  '--gin_file=runs/average_activation.gin',\n"
      f"  \"--gin.INITIAL_CHECKPOINT_PATH='{world['base_hf']}'\",\n"
      "  \"--gin.MIXTURE_OR_TASK_MODULE='rel_tasks'\",\n"
      "  \"--gin.TASK_FEATURE_LENGTHS={'inputs': 8, 'targets': 6}\", '--gin.BATCH_SIZE=2']))\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             PYTHONPATH=os.pathsep.join([REPO, world["task_module_dir"]]))
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        timeout=600, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "of 2 expert(s)" in proc.stdout
  opened = ExpertLibrary.open(lib)
  assert all("average_activation" in opened.metadata(n)["vectors"] for n in ("a", "b"))
  # the same numbers from the Python API on the same batches
  check = (
      "import json, numpy as np, rel_tasks  # noqa: F401\n"
      "from phatgoose_jax import checkpoints\n"
      "from phatgoose_jax.data import pipeline\n"
      "from phatgoose_jax.library import ExpertLibrary\n"
      "from phatgoose_jax.methods import average_activation as aa\n"
      f"lib = ExpertLibrary.open({lib!r})\n"
      f"_, params = checkpoints.load_checkpoint({world['base_hf']!r})\n"
      "expert = lib.load('b')\n"
      "batches = pipeline.get_dataset('rel_tiny', {'inputs': 8, 'targets': 6}, 'train', 2,\n"
      "                               shuffle=False, num_epochs=1, drop_remainder=False)\n"
      "want = aa.expert_average_activation(lib.t5_config, params, expert, batches)\n"
      "got = lib.stack(['b'], vectors='average_activation')\n"
      "print('DIFF', max(float(np.abs(got[s]['gates'][0] - v).max()) for s, v in want.items()))\n")
  proc = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True,
                        timeout=600, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert float(proc.stdout.split("DIFF", 1)[1].split()[0]) < 1e-6
  routed = _eval(dict(world, library=lib), tmp_path / "aa",
                 "--gin_file=routers/average_activation.gin")
  assert routed["methods"] == ["average_activation"]
