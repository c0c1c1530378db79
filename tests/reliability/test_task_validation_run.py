"""`python -m phatgoose_jax.train` with VALIDATION='task': the export is the best step by the
task's own metric (ties to the later step) and its score is what seqio's evaluation gives the
exported adapters."""
import json
import os
import sys

import pytest

import rel_world

LENGTHS = {"inputs": 8, "targets": 6}


def test_train_selects_and_exports_by_task_metric(world, tmp_path):
  model_dir = str(tmp_path / "run")
  proc = rel_world.run_train(
      world, model_dir, LENGTHS, "--gin.BATCH_SIZE=4", "--gin.LORA_RANK=3",
      "--gin.TRAIN_STEPS=2", "--gin.VALIDATION='task'", "--gin.VALIDATION_EXAMPLES=6",
      "--gin.LEARNING_RATE=0.5", "--gin.phatgoose_jax.train.train.eval_every=1",
      "--gin.phatgoose_jax.train.train.data_stats_examples=0")
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(model_dir, "metrics.jsonl")) as f:
    evals = [json.loads(line) for line in f if '"eval"' in line]
  evals = [r for r in evals if r["split"] == "eval"]
  assert [r["step"] for r in evals] == [0, 1, 2]
  for r in evals:
    assert r["average_score"] == pytest.approx(r["rel_tiny/score"])
    assert r["rel_tiny/score"] == pytest.approx(r["rel_tiny/accuracy"])
  best_value = max(r["average_score"] for r in evals)
  best_step = max(r["step"] for r in evals if r["average_score"] == best_value)  # ties: later
  with open(os.path.join(model_dir, "export", "metadata.json")) as f:
    meta = json.load(f)
  assert meta["metric"] == "average_score" and meta["step"] == best_step
  assert meta["metric_value"] == pytest.approx(best_value)

  # Independent check: seqio's evaluation of the exported adapters gives the recorded score.
  sys.path.insert(0, world["task_module_dir"])
  import rel_tasks  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  from phatgoose_jax import adapters, checkpoints  # pylint: disable=g-import-not-at-top
  from phatgoose_jax.evaluation import run_seqio_evaluation  # pylint: disable=g-import-not-at-top
  from phatgoose_jax import training  # pylint: disable=g-import-not-at-top
  config, params = checkpoints.load_checkpoint(world["base_hf"])
  model = adapters.build_model(config, adapters.AdapterConfig(mode="lora", rank=3))
  exported, _ = training.load_exported_adapters(model_dir)
  results = run_seqio_evaluation("rel_tiny", model, {"params": params, "adapters": exported},
                                 task_feature_lengths=LENGTHS, split="validation", batch_size=4,
                                 num_examples=6)
  assert training.validation_scores(results)["average_score"] == pytest.approx(best_value, abs=1e-6)
