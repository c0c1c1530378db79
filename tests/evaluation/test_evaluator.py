"""seqio.Evaluator glue on the data layer's synthetic tasks, the in-memory path and aggregation."""
import numpy as np
import pytest

from phatgoose_jax.evaluation import evaluator as ev
from phatgoose_jax.evaluation import generation

SPLITS = {"train": 4, "validation": 7, "test": 4}
LENGTHS = {"inputs": 40, "targets": 24}


@pytest.fixture(scope="module")
def seqio_tasks(sp_model_path):
  import seqio  # pylint: disable=g-import-not-at-top
  from phatgoose_jax.data import synthetic, vocab  # pylint: disable=g-import-not-at-top
  vocabulary = vocab.get_vocabulary(sp_model_path)
  synthetic.register_synthetic_tasks(vocabulary, prefix="evaltest_", num_examples=SPLITS)
  name = "evaltest_heldout_mix"
  if name in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove(name)
  seqio.MixtureRegistry.add(name, ["evaltest_compose2_choice", "evaltest_compose3_gen"],
                            default_rate=1.0)
  return name, vocabulary


def test_seqio_evaluator_metrics_match_in_memory_path(routed, seqio_tasks):
  import seqio  # pylint: disable=g-import-not-at-top
  from phatgoose_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  model, variables = routed
  name, vocabulary = seqio_tasks
  metrics, outputs = ev.run_seqio_evaluation(name, model, variables, task_feature_lengths=LENGTHS,
                                             split="validation", batch_size=4,
                                             max_decode_length=6, return_outputs=True)
  assert set(metrics) == {"evaltest_compose2_choice", "evaltest_compose3_gen"}
  # Rank classification: per-row seqio scores (one row per (example, choice)) are the in-memory
  # batched scores, and the task's metric (argmax grouped by idx[0]) is our accuracy.
  examples = synthetic.generate_examples("compose2_choice", "validation", SPLITS["validation"])
  local = ev.evaluate_choices(model, variables, vocabulary, examples,
                              task_feature_lengths=LENGTHS, batch_size=1)
  rows = outputs["evaltest_compose2_choice"][seqio.metrics.ModelOutputType.SCORE]
  np.testing.assert_allclose(np.asarray(rows, np.float32),
                             np.concatenate([np.asarray(s) for s in local["scores"]]),
                             rtol=1e-4, atol=1e-4)
  assert len(rows) == 4 * SPLITS["validation"]
  assert metrics["evaltest_compose2_choice"]["accuracy"] == pytest.approx(local["accuracy"])
  # Generation: seqio's exact match over our greedy tokens equals the in-memory path.
  gen = synthetic.generate_examples("compose3_gen", "validation", SPLITS["validation"])
  local_gen = ev.evaluate_generation(model, variables, vocabulary, gen,
                                     task_feature_lengths={"inputs": 40, "targets": 6},
                                     batch_size=4)
  tokens = outputs["evaltest_compose3_gen"][seqio.metrics.ModelOutputType.PREDICTION]
  assert [vocabulary.decode(t) for t in tokens] == local_gen["predictions"]
  assert metrics["evaltest_compose3_gen"]["accuracy"] == pytest.approx(local_gen["exact_match"])


def test_num_examples_caps_whole_examples_not_rows(routed, seqio_tasks):
  """3 examples of a 4-choice task are 12 rows (seqio's own cap would cut at 3 rows, inside the
  first example); a generation task's cap stays 3 rows."""
  import seqio  # pylint: disable=g-import-not-at-top
  from phatgoose_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  model, variables = routed
  name, vocabulary = seqio_tasks
  metrics, outputs = ev.run_seqio_evaluation(name, model, variables, task_feature_lengths=LENGTHS,
                                             split="validation", batch_size=4, num_examples=3,
                                             max_decode_length=6, return_outputs=True)
  rows = outputs["evaltest_compose2_choice"][seqio.metrics.ModelOutputType.SCORE]
  assert len(rows) == 4 * 3
  examples = synthetic.generate_examples("compose2_choice", "validation", SPLITS["validation"])
  local = ev.evaluate_choices(model, variables, vocabulary, examples[:3],
                              task_feature_lengths=LENGTHS, batch_size=1)
  assert metrics["evaltest_compose2_choice"]["accuracy"] == pytest.approx(local["accuracy"])
  assert len(outputs["evaltest_compose3_gen"][seqio.metrics.ModelOutputType.PREDICTION]) == 3
  with pytest.raises(ev.EvaluationError, match="num_examples"):
    ev.run_seqio_evaluation(name, model, variables, num_examples=0)


def test_evaluate_choices_counts_correct_labels(routed, sp_processor):
  """Accuracy follows the labels: relabelling every example with its predicted choice gives 100%."""
  model, variables = routed
  from phatgoose_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  examples = synthetic.generate_examples("compose2_choice", "test", 5)
  first = ev.evaluate_choices(model, variables, sp_processor, examples, batch_size=3)
  relabelled = [dict(ex, label=p) for ex, p in zip(examples, first["predictions"])]
  assert ev.evaluate_choices(model, variables, sp_processor, relabelled,
                             batch_size=3)["accuracy"] == 100.0
  wrong = [dict(ex, label=(p + 1) % 4) for ex, p in zip(examples, first["predictions"])]
  assert ev.evaluate_choices(model, variables, sp_processor, wrong, batch_size=3)["accuracy"] == 0.0
  with pytest.raises(ev.EvaluationError, match="answer_choices"):
    ev.evaluate_choices(model, variables, sp_processor, [{"inputs": "x", "label": 0}])
  for label in (4, -1, "1"):  # out of range or not an index: an error, not a silent 0%
    with pytest.raises(ev.EvaluationError, match="'label'"):
      ev.evaluate_choices(model, variables, sp_processor, [dict(examples[0], label=label)])


def test_dataset_and_aggregate_scores():
  tasks = {"rte_t1": 50.0, "rte_t2": 70.0, "cb_t1": 40.0}
  per_ds = ev.dataset_scores(tasks, lambda t: t.split("_")[0])
  assert per_ds == {"rte": 60.0, "cb": 40.0}
  weighted = ev.dataset_scores(tasks, lambda t: t.split("_")[0],
                               counts={"rte_t1": 1, "rte_t2": 3, "cb_t1": 2})
  assert weighted["rte"] == pytest.approx(65.0)
  agg = ev.aggregate_scores(per_ds)
  assert agg["average"] == pytest.approx(50.0)  # unweighted over datasets, not templates
  with pytest.raises(ev.EvaluationError, match="average"):
    ev.aggregate_scores({"average": 1.0})
  with pytest.raises(ev.EvaluationError, match="no dataset for task 'x'"):
    ev.dataset_scores({"x": 1.0}, {})
