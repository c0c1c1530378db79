"""Validation by the task's own metrics (official Evaluator convention) and the tie rule of fit."""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import training_helpers as F
from phatgoose_jax.training import load_exported_adapters, make_task_eval_fn, validation_scores
from phatgoose_jax.training import state as state_lib


def test_scores_are_means_of_metrics_then_of_tasks():
  results = {"b_task": {"accuracy": 0.5, "f1": 0.25, "note": "text", "flag": True},
             "a_task": {"exact_match": 1.0},
             "empty": {"predictions": ["x"]}}
  out = validation_scores(results)
  assert out["b_task/score"] == pytest.approx(0.375)
  assert out["a_task/score"] == pytest.approx(1.0)
  assert out["average_score"] == pytest.approx((0.375 + 1.0) / 2)
  assert out["b_task/accuracy"] == 0.5 and "b_task/note" not in out and "empty/score" not in out
  with pytest.raises(ValueError, match="no numeric metric"):
    validation_scores({"t": {"text": "abc"}})


@pytest.mark.parametrize("ties, best_step", [("last", 4), ("first", 2)])
def test_ties_rule_picks_the_later_or_earlier_step(ties, best_step, tmp_path):
  _, model, variables = F.make_model("lora")
  trainer = F.make_trainer(model, variables, "lora", warmup_steps=0)
  scores = {0: 0.1, 2: 0.5, 4: 0.5, 6: 0.3}
  result = trainer.fit(trainer.create_state(variables), F.batches(), steps=6,
                       model_dir=str(tmp_path), eval_every=2,
                       eval_fn=lambda s: {"average_score": scores[int(s["step"])]},
                       best_metric="average_score", best_mode="max", best_ties=ties,
                       progress=False, handle_signals=False)
  assert result.best == {"step": best_step, "metric": "average_score", "value": 0.5}
  _, meta = load_exported_adapters(str(tmp_path))
  assert meta["step"] == best_step and meta["metric"] == "average_score"
  with pytest.raises(ValueError, match="best_ties"):
    trainer.fit(trainer.create_state(variables), F.batches(), steps=1, model_dir=str(tmp_path),
                best_ties="middle", progress=False, handle_signals=False)


def test_task_eval_fn_scores_the_states_adapters_on_the_frozen_base(tmp_path):
  _, model, variables = F.make_model("lora")
  trainer = F.make_trainer(model, variables, "lora", warmup_steps=0)
  state = trainer.create_state(variables)
  calls = []

  def fake_evaluate(name, mdl, variables, **kw):
    calls.append((name, mdl, variables, kw))
    # A metric that depends on the adapters it was given: their summed |lora_b|.
    total = sum(float(np.abs(v).sum()) for k, v in state_lib.flatten(variables["adapters"]).items()
                if k.endswith("lora_b"))
    return {name: {"accuracy": total, "exact_match": 0.0}}

  eval_fn = make_task_eval_fn(trainer, "my_task", task_feature_lengths={"inputs": 7, "targets": 5},
                              split="validation", batch_size=3, num_examples=11,
                              evaluate=fake_evaluate)
  out = eval_fn(state)
  name, mdl, given, kw = calls[0]
  assert name == "my_task" and mdl is trainer.model
  assert given["params"] is trainer.base_params
  want = sum(float(np.abs(v).sum()) for k, v in
             state_lib.flatten(F.to_numpy(trainer.adapters(state))).items() if k.endswith("lora_b"))
  assert want > 0 and out["my_task/accuracy"] == pytest.approx(want, rel=1e-6)
  assert out["average_score"] == pytest.approx(want / 2, rel=1e-6)
  assert kw == {"task_feature_lengths": {"inputs": 7, "targets": 5}, "split": "validation",
                "batch_size": 3, "num_examples": 11}
