"""Truncated and empty examples are counted in the training log (issue: Reliability).

`rel_tiny` (tests/reliability/rel_world.py) has over-long inputs/targets and two rows with an empty
input or target, repeated 3 times. A real `python -m phatgoose_jax.train` run writes a
``"split": "data"`` record to MODEL_DIR/metrics.jsonl; its counts must equal an independent count
made here with the task's own vocabulary.
"""
import json
import os

import seqio

import rel_world

LENGTHS = {"inputs": 8, "targets": 6}


def test_train_logs_truncated_and_dropped_counts(world, tmp_path):
  model_dir = str(tmp_path / "run")
  proc = rel_world.run_train(world, model_dir, LENGTHS, "--gin.BATCH_SIZE=2",
                             "--gin.TRAIN_STEPS=1",
                             "--gin.phatgoose_jax.train.train.eval_split=None")
  assert proc.returncode == 0, proc.stderr[-2000:]
  with open(os.path.join(model_dir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  data = [r for r in records if r["split"] == "data"]
  assert len(data) == 1

  vocab = seqio.SentencePieceVocabulary(world["vocab"])
  rows = rel_world.TRAIN_ROWS
  non_empty = [(i, t) for i, t in rows if vocab.encode(i) and vocab.encode(t)]
  expected = {
      "num_examples": len(rows),
      "dropped_empty": len(rows) - len(non_empty),
      "inputs_truncated": sum(len(vocab.encode(i)) + 1 > LENGTHS["inputs"] for i, _ in non_empty),
      "targets_truncated": sum(len(vocab.encode(t)) + 1 > LENGTHS["targets"]
                               for _, t in non_empty),
  }
  assert expected["dropped_empty"] == 6 and expected["inputs_truncated"] > 0
  assert {k: data[0][k] for k in expected} == expected
