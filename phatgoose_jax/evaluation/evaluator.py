"""Evaluation through ``seqio.Evaluator`` (tasks' own metric fns), an in-memory path, aggregation.

seqio path (t5x convention): ``seqio.Evaluator`` caches each task's eval split, converts it with
``seqio.EncDecFeatureConverter(pack=False)``, enumerates it and calls our callables with the
enumerated ``tf.data.Dataset`` of ``(index, model features)``:
  * ``score_fn(dataset) -> [(index, score)]``: one score per row. A rank-classification task has one
    row per (example, choice) (``idx`` = [example, choice], ``is_correct``); its metric
    (`phatgoose_jax.data.preprocessors.rank_classification_accuracy`) groups rows by ``idx[0]`` and
    takes the argmax. Rows of the same example share their input, so the encoder runs once per
    distinct input of a batch (`scoring.score_rows`).
  * ``predict_fn(dataset) -> [(index, tokens)]``: greedy tokens, detokenised by seqio with the
    task's vocabulary, postprocessed and passed to the task's predict metrics.
  * ``predict_with_aux_fn``: the same plus ``{'scores': summed log-likelihood of each output}``.
Scores are length-normalised mean token log-likelihoods including EOS by default (PHATGOOSE's
official rank classification, see `scoring`); ``length_normalize=False`` gives t5x's summed score.

In-memory path (no TensorFlow; the CPU demo): `evaluate_choices` / `evaluate_generation` on lists of
dicts with a python vocabulary.

Aggregation (PHATGOOSE sec. 4.1, T0 held-out): a dataset's accuracy is the mean over its (example,
template) pairs; the reported number is the unweighted mean over datasets (`aggregate_scores`).

Letters: N rows/examples, B batch, C choices.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence, Union

import flax.linen as nn
import numpy as np

from phatgoose_jax.evaluation import generation
from phatgoose_jax.evaluation import scoring

SiteInputsFn = Callable[[Mapping[str, np.ndarray]], Mapping[str, Any]]


class EvaluationError(ValueError):
  """Bad evaluation arguments or data."""


def _batches(dataset: Any, batch_size: int):
  """(indices [B], features {name: [B, ...]}) numpy batches of an enumerated seqio dataset."""
  for indices, features in dataset.batch(batch_size).as_numpy_iterator():
    yield np.asarray(indices), {k: np.asarray(v) for k, v in features.items()}


def _check_batch_size(batch_size: int, where: str) -> int:
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise EvaluationError(f"{where}: batch_size must be a positive int, got {batch_size!r}")
  return batch_size


def make_score_fn(model: nn.Module, variables: Mapping[str, Any], *, batch_size: int = 32,
                  length_normalize: bool = True,
                  site_inputs_fn: Optional[SiteInputsFn] = None) -> Callable:
  """The ``score_fn`` of ``seqio.Evaluator.evaluate``.

  Args:
    model, variables: the model (base, LoRA, routed library).
    batch_size: rows per jitted call (every batch is padded to it).
    length_normalize: mean (True) or summed token log-likelihood.
    site_inputs_fn: maps a numpy batch of model features to per-row ``site_inputs`` (e.g.
      ``{'expert_weights': [B, E]}``); None for none.

  Returns:
    ``score_fn(dataset, model_feature_shapes=None) -> list[(index, float)]``.
  """
  _check_batch_size(batch_size, "make_score_fn")
  key = "mean" if length_normalize else "sum"

  def score_fn(dataset, model_feature_shapes=None):
    del model_feature_shapes
    out = []
    for indices, feats in _batches(dataset, batch_size):
      site_inputs = site_inputs_fn(feats) if site_inputs_fn else None
      scores = scoring.score_rows(model, variables, feats["encoder_input_tokens"],
                                  feats["decoder_target_tokens"], site_inputs,
                                  decoder_loss_weights=feats.get("decoder_loss_weights"),
                                  pad_rows_to=batch_size)[key]
      out.extend((int(i), float(s)) for i, s in zip(indices, scores))
    return out
  return score_fn


def make_predict_fn(model: nn.Module, variables: Mapping[str, Any], *, batch_size: int = 32,
                    max_decode_length: Optional[int] = None, eos_id: int = 1,
                    site_inputs_fn: Optional[SiteInputsFn] = None,
                    with_aux: bool = False) -> Callable:
  """The ``predict_fn`` (or, ``with_aux``, ``predict_with_aux_fn``) of ``seqio.Evaluator``.

  Args:
    model, variables: the model.
    batch_size: examples per decoding call.
    max_decode_length: T; default the dataset's ``decoder_target_tokens`` length.
    eos_id: EOS id.
    site_inputs_fn: as in `make_score_fn`.
    with_aux: also return ``{'scores': [summed log-likelihood of each output]}``.

  Returns:
    ``fn(dataset, model_feature_shapes=None)`` returning ``[(index, tokens [T])]`` (with aux:
    a tuple of that and the aux dict). seqio decodes tokens up to the first EOS.
  """
  _check_batch_size(batch_size, "make_predict_fn")

  def predict_fn(dataset, model_feature_shapes=None):
    length = max_decode_length
    if length is None and model_feature_shapes and "decoder_target_tokens" in model_feature_shapes:
      length = int(model_feature_shapes["decoder_target_tokens"][-1])
    if length is None:
      length = int(dataset.element_spec[1]["decoder_target_tokens"].shape[-1])
    pairs, aux = [], []
    for indices, feats in _batches(dataset, batch_size):
      site_inputs = site_inputs_fn(feats) if site_inputs_fn else None
      enc = feats["encoder_input_tokens"]
      tokens = generation.generate_tokens(model, variables, scoring.pad_rows(enc, batch_size),
                                          length, eos_id=eos_id, site_inputs=(
                                              {k: scoring.pad_rows(np.asarray(v), batch_size)
                                               for k, v in site_inputs.items()}
                                              if site_inputs else None))[:len(indices)]
      pairs.extend((int(i), t.tolist()) for i, t in zip(indices, tokens))
      if with_aux:
        aux.extend(scoring.score_rows(model, variables, enc, tokens, site_inputs,
                                      pad_rows_to=batch_size)["sum"].tolist())
    if with_aux:
      return pairs, {"scores": aux}
    return pairs
  return predict_fn


def _to_float(value: Any) -> Any:
  value = getattr(value, "value", value)  # seqio/clu Scalar
  try:
    return float(np.asarray(value))
  except (TypeError, ValueError):
    return value


def run_seqio_evaluation(mixture_or_task_name: str, model: nn.Module,
                         variables: Mapping[str, Any], *,
                         task_feature_lengths: Optional[Mapping[str, int]] = None,
                         split: str = "validation", batch_size: int = 32,
                         num_examples: Optional[int] = None, length_normalize: bool = True,
                         site_inputs_fn: Optional[SiteInputsFn] = None,
                         max_decode_length: Optional[int] = None,
                         return_outputs: bool = False) -> Any:
  """Evaluates every sub-task of a seqio Task/Mixture with its own metric fns.

  Args:
    mixture_or_task_name: a registered seqio name.
    model, variables: the model.
    task_feature_lengths: {'inputs': L, 'targets': T}; None measures the data.
    split: eval split.
    batch_size: rows per call.
    num_examples: optional cap per task: its first ``num_examples`` EXAMPLES, whole. A
      rank-classification example is several rows (one per choice, ``idx`` = [example, choice]);
      seqio's own ``num_examples`` cuts rows, which could score an example on part of its
      choices, so each task gets the row count that covers its first examples exactly.
    length_normalize: score convention for score metrics.
    site_inputs_fn: per-batch ``site_inputs`` (see `make_score_fn`).
    max_decode_length: decoding steps for every task (default: each task's registered
      `registry.decode_length`, else the targets length).
    return_outputs: also return seqio's model outputs ``{task: {ModelOutputType: [per row]}}``.

  Returns:
    {task name: {metric name: value (floats where possible)}} (with ``return_outputs``: a tuple of
    that and the outputs).
  """
  import seqio  # pylint: disable=g-import-not-at-top
  from phatgoose_jax.data import registry  # pylint: disable=g-import-not-at-top
  _check_batch_size(batch_size, "run_seqio_evaluation")
  if num_examples is not None and (isinstance(num_examples, bool)
                                   or not isinstance(num_examples, int) or num_examples < 1):
    raise EvaluationError(f"run_seqio_evaluation: num_examples must be a positive int or None, "
                          f"got {num_examples!r}")
  provider = registry.get_task_or_mixture(mixture_or_task_name)  # one-line error for unknown names
  lengths = dict(task_feature_lengths) if task_feature_lengths else None
  common = dict(batch_size=batch_size, site_inputs_fn=site_inputs_fn)

  score_fn = make_score_fn(model, variables, length_normalize=length_normalize, **common)
  predict_fns: dict = {}  # one pair per distinct decoding budget, shared by the sub-tasks

  def fns(steps):
    if steps not in predict_fns:
      predict_fns[steps] = dict(
          predict_fn=make_predict_fn(model, variables, max_decode_length=steps, **common),
          predict_with_aux_fn=make_predict_fn(model, variables, max_decode_length=steps,
                                              with_aux=True, **common))
    return dict(score_fn=score_fn, **predict_fns[steps])

  # One seqio.Evaluator per sub-task: each gets its own decoding budget (the task's registered
  # `registry.decode_length`, e.g. BIG-bench's max_gen_length, unless max_decode_length is given)
  # and, with num_examples, the rows of its first examples.
  tasks = [t for t in seqio.get_subtasks(provider) if split in t.splits and t.metric_fns]
  runs = [(t.name, None if num_examples is None else
           _rows_of_first_examples(t, split, lengths, num_examples),
           max_decode_length or registry.decode_length(t.name)) for t in tasks]
  results: dict = {}
  outputs: dict = {}
  for name, rows, steps in runs or [(mixture_or_task_name, None, max_decode_length)]:
    evaluator = seqio.Evaluator(
        mixture_or_task_name=name, feature_converter=seqio.EncDecFeatureConverter(pack=False),
        eval_split=split, sequence_length=lengths, num_examples=rows, use_memory_cache=True,
        async_compute_metrics=False)
    try:
      if not evaluator.eval_tasks:
        raise EvaluationError(f"{mixture_or_task_name!r} has no task with split {split!r} and "
                              "metric fns")
      metrics, task_outputs = evaluator.evaluate(compute_metrics=True, **fns(steps))
      results.update(metrics.result())
      outputs.update(task_outputs)
    finally:
      evaluator.close()
  results = {task: {k: _to_float(v) for k, v in values.items()} for task, values in results.items()}
  return (results, outputs) if return_outputs else results


def _rows_of_first_examples(task: Any, split: str, lengths: Optional[Mapping[str, int]],
                            num_examples: int) -> int:
  """Rows of ``task``'s preprocessed ``split`` (in seqio's eval order) that make up its first
  ``num_examples`` examples: rows sharing ``idx[0]`` (rank classification) are one example."""
  # shuffle=False and seed 42 as seqio.Evaluator reads it (the seed matters only to random
  # preprocessors)
  dataset = task.get_dataset(sequence_length=lengths, split=split, shuffle=False, num_epochs=1,
                             seed=42)
  rows, examples, previous = 0, 0, None
  for row in dataset.as_numpy_iterator():
    idx = row.get("idx")
    key = (int(np.asarray(idx).reshape(-1)[0]) if idx is not None and np.size(idx) == 2
           else rows)  # no (example, choice) index: one row is one example
    if key != previous:
      if examples == num_examples:
        break
      examples, previous = examples + 1, key
    rows += 1
  return rows


# ------------------------------------------------------------------------------------------------
# In-memory path (no TensorFlow)
# ------------------------------------------------------------------------------------------------
def _lengths(task_feature_lengths: Optional[Mapping[str, int]]) -> tuple:
  if task_feature_lengths is None:
    return None, None
  for k in ("inputs", "targets"):
    if k not in task_feature_lengths:
      raise EvaluationError(f"task_feature_lengths needs key {k!r}, got "
                            f"{dict(task_feature_lengths)}")
  return int(task_feature_lengths["inputs"]), int(task_feature_lengths["targets"])


def evaluate_choices(model: nn.Module, variables: Mapping[str, Any], vocabulary: Any,
                     examples: Sequence[Mapping[str, Any]], *,
                     task_feature_lengths: Optional[Mapping[str, int]] = None,
                     batch_size: int = 16, site_inputs: scoring.SiteInputs = None,
                     length_normalize: bool = True, inputs_key: str = "inputs",
                     choices_key: str = "answer_choices",
                     label_key: str = "label") -> dict[str, Any]:
  """Rank-classification accuracy (%) of in-memory examples.

  Args:
    model, variables: the model.
    vocabulary: python tokenizer with ``encode``/``decode`` (T5 ids).
    examples: dicts with ``inputs_key`` (str), ``choices_key`` (list of str), ``label_key`` (int).
    task_feature_lengths: optional {'inputs': L, 'targets': T} truncation (keeping EOS).
    batch_size: examples per call.
    site_inputs: per-example extras, leaves [N, ...].
    length_normalize: mean (True) or summed log-likelihood.

  Returns:
    {'accuracy': %, 'num_examples', 'predictions': [N] choice indices, 'scores': [N][C_i]}.
  """
  if not examples:
    raise EvaluationError("evaluate_choices: no examples")
  for i, ex in enumerate(examples):
    for k in (inputs_key, choices_key, label_key):
      if k not in ex:
        raise EvaluationError(f"evaluate_choices: example {i} has no field {k!r} (has "
                              f"{sorted(ex)})")
    label, num = ex[label_key], len(ex[choices_key])
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not (
        0 <= label < num):
      raise EvaluationError(f"evaluate_choices: example {i} field {label_key!r} = {label!r} is "
                            f"not a choice index in [0, {num})")
  len_in, len_out = _lengths(task_feature_lengths)
  inputs = generation.encode_texts(vocabulary, [ex[inputs_key] for ex in examples], len_in)
  choices = [generation.encode_texts(vocabulary, list(ex[choices_key]), len_out)
             for ex in examples]
  res = scoring.rank_classify(model, variables, inputs, choices, batch_size=batch_size,
                              site_inputs=site_inputs, length_normalize=length_normalize)
  labels = np.asarray([int(ex[label_key]) for ex in examples])
  preds = res.predictions
  return {"accuracy": 100.0 * float(np.mean(preds == labels)), "num_examples": len(examples),
          "predictions": [int(p) for p in preds],
          "scores": [[float(s) for s in row[:len(c)]] for row, c in zip(res.scores, choices)]}


def evaluate_generation(model: nn.Module, variables: Mapping[str, Any], vocabulary: Any,
                        examples: Sequence[Mapping[str, Any]], *,
                        task_feature_lengths: Mapping[str, int], batch_size: int = 16,
                        site_inputs: scoring.SiteInputs = None, inputs_key: str = "inputs",
                        targets_key: str = "targets") -> dict[str, Any]:
  """Exact-match accuracy (%) of greedy outputs on in-memory examples.

  Args:
    model, variables: the model.
    vocabulary: python tokenizer (T5 ids).
    examples: dicts with ``inputs_key`` and ``targets_key`` strings.
    task_feature_lengths: {'inputs': L, 'targets': T}; T is the number of decoding steps.
    batch_size: examples per decoding call.
    site_inputs: per-example extras, leaves [N, ...].

  Returns:
    {'exact_match': %, 'num_examples', 'predictions': [N] strings}.
  """
  from phatgoose_jax.data import preprocessors as prep  # pylint: disable=g-import-not-at-top
  if not examples:
    raise EvaluationError("evaluate_generation: no examples")
  len_in, len_out = _lengths(task_feature_lengths)
  if len_in is None:
    raise EvaluationError("evaluate_generation: task_feature_lengths is required")
  for i, ex in enumerate(examples):
    for k in (inputs_key, targets_key):
      if k not in ex:
        raise EvaluationError(f"evaluate_generation: example {i} has no field {k!r}")
  preds = generation.generate_texts(model, variables, vocabulary,
                                    [ex[inputs_key] for ex in examples], input_length=len_in,
                                    max_decode_length=len_out, batch_size=batch_size,
                                    site_inputs=site_inputs)
  acc = prep.exact_match_accuracy([ex[targets_key] for ex in examples], preds)["accuracy"]
  return {"exact_match": acc, "num_examples": len(examples), "predictions": preds}


# ------------------------------------------------------------------------------------------------
# Aggregation
# ------------------------------------------------------------------------------------------------
def dataset_scores(task_scores: Mapping[str, float],
                   dataset_of: Union[Mapping[str, str], Callable[[str], str]],
                   counts: Optional[Mapping[str, int]] = None) -> dict[str, float]:
  """Per-dataset accuracy = mean over its (example, template) pairs.

  Args:
    task_scores: {task (one template of a dataset): accuracy}.
    dataset_of: task -> dataset name (mapping or function).
    counts: optional {task: number of examples}; the mean over (example, template) pairs weights
      each template by its examples (templates of one dataset share examples in P3, so without
      counts the plain mean over templates is the same number).

  Returns:
    {dataset: accuracy}.
  """
  groups: dict[str, list[tuple[float, float]]] = {}
  for task, score in task_scores.items():
    try:
      ds = dataset_of(task) if callable(dataset_of) else dataset_of[task]
    except KeyError:
      raise EvaluationError(f"dataset_scores: no dataset for task {task!r}") from None
    weight = 1.0 if counts is None else float(counts[task])
    groups.setdefault(ds, []).append((float(score), weight))
  out = {}
  for ds, items in groups.items():
    total = sum(w for _, w in items)
    if total <= 0:
      raise EvaluationError(f"dataset_scores: dataset {ds!r} has no examples")
    out[ds] = sum(s * w for s, w in items) / total
  return out


def aggregate_scores(scores: Mapping[str, float]) -> dict[str, float]:
  """``scores`` plus ``'average'``, their unweighted mean (PHATGOOSE's reported number)."""
  if not scores:
    raise EvaluationError("aggregate_scores: no scores")
  if "average" in scores:
    raise EvaluationError("aggregate_scores: 'average' is reserved and cannot be a dataset name")
  out = {k: float(v) for k, v in scores.items()}
  out["average"] = float(np.mean(list(out.values())))
  return out
