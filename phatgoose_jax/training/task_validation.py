"""Checkpoint selection by the task's own metrics, as the official PHATGOOSE recipe selects.

The official code (r-three/phatgoose, ``src/procedures/evaluator.py`` and
``src/procedures/utils/result_aggregators.py``) validates an expert or gate run with each
dataset's metrics (rank-classification accuracy for multiple-choice data, exact match / ROUGE
for generative data): every dataset's ``score`` is the mean of its metric values, the run's
``average_score`` the mean of the dataset scores (``MainAggregator``, reduction "mean"), and a
validation result becomes the new best when ``average_score >= best`` (higher is better; a tie
goes to the later step). `validation_scores` computes those numbers from seqio's per-task
metrics and `make_task_eval_fn` builds the ``eval_fn`` of `Trainer.fit` that runs seqio's
evaluation (`phatgoose_jax.evaluation.run_seqio_evaluation`) on the current adapters; the
train entry point uses it with ``train.validation = 'task'`` (best metric ``average_score``,
mode ``max``, ties to the later step).

Single host: every host would evaluate the whole validation split (seqio's Evaluator is not
sharded here).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional

AVERAGE = "average_score"


def _number(value: Any) -> Optional[float]:
  """``value`` as a finite float, or None for non-numeric metric outputs (texts, lists)."""
  if isinstance(value, bool):
    return None
  try:
    out = float(value)
  except (TypeError, ValueError):
    return None
  return out if math.isfinite(out) else None


def validation_scores(results: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
  """Flattens ``{task: {metric: value}}`` and adds the official aggregates.

  Args:
    results: seqio's metrics per task (`run_seqio_evaluation` output). Non-numeric values are
      ignored.

  Returns:
    ``{'<task>/<metric>': value, '<task>/score': mean of the task's numeric metrics,
    'average_score': mean of the task scores}``.

  Raises:
    ValueError: when no task produced a numeric metric.
  """
  out: dict[str, float] = {}
  scores = []
  for task in sorted(results):
    values = {m: _number(v) for m, v in results[task].items()}
    values = {m: v for m, v in values.items() if v is not None}
    if not values:
      continue
    for metric, value in sorted(values.items()):
      out[f"{task}/{metric}"] = value
    score = sum(values.values()) / len(values)
    out[f"{task}/score"] = score
    scores.append(score)
  if not scores:
    raise ValueError(f"task validation: no numeric metric in the results of tasks "
                     f"{sorted(results)}")
  out[AVERAGE] = sum(scores) / len(scores)
  return out


def make_task_eval_fn(trainer: Any, mixture_or_task_name: str, *,
                      task_feature_lengths: Optional[Mapping[str, int]], split: str,
                      batch_size: int, num_examples: Optional[int] = None,
                      evaluate: Optional[Callable[..., Any]] = None
                      ) -> Callable[[Mapping[str, Any]], dict[str, float]]:
  """``eval_fn(state) -> validation_scores(...)`` for `Trainer.fit`.

  Args:
    trainer: the `phatgoose_jax.training.Trainer` (its model, frozen base and the state's
      adapters are evaluated).
    mixture_or_task_name: the seqio task or mixture whose ``split`` is scored with its own
      metric fns.
    task_feature_lengths: {'inputs': L, 'targets': T} (longer rows are truncated as in training).
    split: validation split.
    batch_size: rows per scoring call.
    num_examples: first rows of each task (None: all).
    evaluate: the evaluation function (default `evaluation.run_seqio_evaluation`; tests pass
      a stub).

  Returns:
    The eval_fn.
  """
  if evaluate is None:
    from phatgoose_jax.evaluation import evaluator  # pylint: disable=g-import-not-at-top
    evaluate = evaluator.run_seqio_evaluation

  def eval_fn(state: Mapping[str, Any]) -> dict[str, float]:
    variables = {"params": trainer.base_params, "adapters": trainer.adapters(state)}
    results = evaluate(mixture_or_task_name, trainer.model, variables,
                       task_feature_lengths=task_feature_lengths, split=split,
                       batch_size=batch_size, num_examples=num_examples)
    return validation_scores(results)

  return eval_fn
