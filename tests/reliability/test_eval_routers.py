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
