"""seqio preprocessors, rank classification and the metrics that go with it.

Two flavours of each transform live here:
* tf.data preprocessors (`fn(dataset, ...) -> dataset`) for seqio Tasks;
  TensorFlow is imported lazily so that the pure-python helpers stay light;
* pure-python helpers over lists of dicts for the numpy pipeline
  (`pipeline.encode_examples`), used by choice scoring and the offline demo.

Rank classification follows the T0 / PHATGOOSE evaluation protocol (Sanh et
al. 2022; bigscience/P3 `*_score_eval` configs): an example with C answer
choices becomes C rows `{inputs, targets=choice c, idx=[example, c],
is_correct}`; the model's log-likelihood of each target is a row's score and an
example counts as correct when its highest-scoring row is a correct one.

Truncation (PHATGOOSE recipe, as t5x/seqio do it): a feature longer than its
length L keeps its first L-1 tokens and then EOS (use
`seqio.preprocessors.append_eos_after_trim` in Tasks; `truncate_keep_eos` in
python). Letters: B batch, C answer choices.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np


class PreprocessorError(ValueError):
  """A preprocessor was given examples without the fields it needs."""


def _check_fields(dataset, fields: Iterable[str], where: str) -> None:
  spec = dataset.element_spec
  missing = [f for f in fields if f not in spec]
  if missing:
    raise PreprocessorError(
        f"{where}: missing field(s) {missing}; available: {sorted(spec)}")


# ----------------------------------------------------------------------------
# tf.data preprocessors
# ----------------------------------------------------------------------------
def rename_fields(dataset, key_map: Mapping[str, str],
                  keep: Optional[Sequence[str]] = None):
  """Renames fields (`{new_name: old_name}`) and drops all others.

  Args:
    dataset: tf.data.Dataset of dicts.
    key_map: output name -> input name, e.g. {"inputs": "question",
      "targets": "answer"}.
    keep: extra input fields to pass through unchanged.
  """
  keep = tuple(keep or ())
  _check_fields(dataset, list(key_map.values()) + list(keep), "rename_fields")

  def fn(ex):
    out = {new: ex[old] for new, old in key_map.items()}
    out.update({k: ex[k] for k in keep})
    return out
  return dataset.map(fn)


def p3_rows_to_text(dataset, strip_targets: bool = True):
  """Maps bigscience/P3 rows to text `inputs` / `targets` (+ choice fields).

  P3 rows carry T5-tokenized `inputs`/`targets` and the rendered prompt in
  `inputs_pretokenized`/`targets_pretokenized`; `*_score_eval` configs add
  `idx` [2] (example, choice), `is_correct` and `weight`; other configs may carry
  `answer_choices`. The text fields become `inputs`/`targets` (to be
  re-tokenized by the Task's vocabulary); the choice fields pass through.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  _check_fields(dataset, ("inputs_pretokenized", "targets_pretokenized"),
                "p3_rows_to_text")
  passthrough = [k for k in ("answer_choices", "idx", "is_correct", "weight")
                 if k in dataset.element_spec]

  def fn(ex):
    targets = ex["targets_pretokenized"]
    if strip_targets:
      targets = tf.strings.strip(targets)
    out = {"inputs": ex["inputs_pretokenized"], "targets": targets}
    out.update({k: ex[k] for k in passthrough})
    return out
  return dataset.map(fn)


def filter_empty(dataset, keys: Sequence[str] = ("inputs", "targets")):
  """Drops examples whose string (after strip) or token list is empty."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  _check_fields(dataset, keys, "filter_empty")
  spec = dataset.element_spec

  def keep(ex):
    ok = tf.constant(True)
    for k in keys:
      v = ex[k]
      if spec[k].dtype == tf.string and spec[k].shape.rank == 0:
        ok = tf.logical_and(ok, tf.strings.length(tf.strings.strip(v)) > 0)
      else:
        ok = tf.logical_and(ok, tf.size(v) > 0)
    return ok
  return dataset.filter(keep)


def rank_classification(dataset, inputs_key: str = "inputs",
                        choices_key: str = "answer_choices",
                        label_key: str = "label",
                        index_key: Optional[str] = None,
                        mode: str = "eval"):
  """Expands each example into one row per answer choice (tf.data).

  Args:
    dataset: examples with `inputs_key` (string), `choices_key` (string [C])
      and `label_key` (int, the correct choice).
    index_key: an existing int field holding the example index; None numbers
      examples in dataset order (after any sharding, i.e. per shard).
    mode: "eval" keeps all C rows; "train" keeps only the correct row.

  Returns:
    Dataset of rows {inputs, targets, idx: int32 [2] (example, choice),
    is_correct: bool}.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if mode not in ("eval", "train"):
    raise PreprocessorError(f"rank_classification mode must be 'eval' or "
                            f"'train', got {mode!r}")
  fields = [inputs_key, choices_key, label_key] + ([index_key] if index_key else [])
  _check_fields(dataset, fields, "rank_classification")
  if index_key is None:
    dataset = dataset.enumerate()
  else:
    dataset = dataset.map(lambda ex: (ex[index_key], ex))

  def expand(i, ex):
    choices = ex[choices_key]  # [C]
    num = tf.shape(choices)[0]
    c = tf.range(num, dtype=tf.int32)
    label = tf.cast(ex[label_key], tf.int32)
    # As the python `rank_classification_rows`: a label outside [0, C) (or no choice at all)
    # is a data error, not an example silently scored wrong or dropped.
    tf.debugging.assert_greater(num, 0, message=f"rank_classification: an example has an "
                                f"empty {choices_key!r}")
    tf.debugging.assert_less(label, num, message=f"rank_classification: {label_key!r} is not "
                             f"an index into {choices_key!r}")
    tf.debugging.assert_non_negative(label, message=f"rank_classification: {label_key!r} is "
                                     "negative")
    rows = {
        "inputs": tf.fill([num], ex[inputs_key]),
        "targets": choices,
        "idx": tf.stack([tf.fill([num], tf.cast(i, tf.int32)), c], axis=1),
        "is_correct": tf.equal(c, label),
    }
    ds = tf.data.Dataset.from_tensor_slices(rows)
    if mode == "train":
      ds = ds.filter(lambda r: r["is_correct"])
    return ds
  return dataset.flat_map(expand)


# ----------------------------------------------------------------------------
# pure-python counterparts
# ----------------------------------------------------------------------------
def rank_classification_rows(examples: Sequence[Mapping[str, Any]],
                             inputs_key: str = "inputs",
                             choices_key: str = "answer_choices",
                             label_key: str = "label",
                             mode: str = "eval") -> list[dict[str, Any]]:
  """Python twin of `rank_classification` over a list of dicts."""
  if mode not in ("eval", "train"):
    raise PreprocessorError(f"mode must be 'eval' or 'train', got {mode!r}")
  rows = []
  for i, ex in enumerate(examples):
    for k in (inputs_key, choices_key, label_key):
      if k not in ex:
        raise PreprocessorError(
            f"rank_classification_rows: example {i} has no field {k!r} "
            f"(has {sorted(ex)})")
    choices = list(ex[choices_key])
    label = int(ex[label_key])
    if not 0 <= label < len(choices):
      raise PreprocessorError(
          f"rank_classification_rows: example {i} field {label_key!r}={label} "
          f"is outside [0, {len(choices)})")
    for c, choice in enumerate(choices):
      if mode == "train" and c != label:
        continue
      rows.append({"inputs": ex[inputs_key], "targets": choice,
                   "idx": np.array([i, c], np.int32), "is_correct": c == label})
  return rows


def truncate_keep_eos(ids: Sequence[int], max_length: int,
                      eos_id: int = 1) -> tuple[list[int], bool]:
  """Appends EOS, keeping the first `max_length - 1` tokens if too long.

  Returns:
    (token ids ending in EOS of length <= max_length, whether it was cut).
  """
  if max_length < 1:
    raise PreprocessorError(f"max_length must be >= 1, got {max_length}")
  ids = list(ids)
  truncated = len(ids) + 1 > max_length
  return ids[: max_length - 1] + [eos_id], truncated


def is_empty_example(ex: Mapping[str, Any],
                     keys: Sequence[str] = ("inputs", "targets")) -> bool:
  """True when any of `keys` is an empty / whitespace-only string or list."""
  for k in keys:
    v = ex.get(k)
    if v is None:
      return True
    if isinstance(v, (str, bytes)):
      if not v.strip():
        return True
    elif len(v) == 0:
      return True
  return False


def answer_choices_instance_text(inputs: str, answer_choices: Sequence[str],
                                 separator: str = ", ") -> str:
  """"Answer Choices: {choices}, Instance: {input}" (retrieval query text)."""
  return (f"Answer Choices: {separator.join(str(c) for c in answer_choices)}, "
          f"Instance: {inputs}")


# ----------------------------------------------------------------------------
# postprocessor + metrics (plain functions seqio.Evaluator accepts)
# ----------------------------------------------------------------------------
def _text(x) -> str:
  if isinstance(x, bytes):
    return x.decode("utf-8")
  return str(x)


def rank_classification_postprocessor(output, example=None, is_target=False):
  """Targets -> (example index, choice index, is_correct); outputs unchanged."""
  if not is_target:
    return output
  if example is None or "idx" not in example or "is_correct" not in example:
    raise PreprocessorError(
        "rank_classification_postprocessor needs example fields 'idx' and "
        "'is_correct'")
  idx = np.asarray(example["idx"]).reshape(-1)
  return (int(idx[0]), int(idx[1]), bool(example["is_correct"]))


def rank_classification_accuracy(targets, scores) -> dict[str, float]:
  """Accuracy (%) of picking a correct choice by the highest score.

  Args:
    targets: per row, (example index, choice index, is_correct) as produced by
      `rank_classification_postprocessor`.
    scores: per row, the log-likelihood of the row's target.
  """
  if len(targets) != len(scores):
    raise PreprocessorError(
        f"rank_classification_accuracy: {len(targets)} targets vs "
        f"{len(scores)} scores")
  if not targets:
    raise PreprocessorError("rank_classification_accuracy: no rows")
  best: dict[int, tuple[float, bool]] = {}
  for (ex, _, correct), score in zip(targets, scores):
    score = float(np.asarray(score).sum())
    if ex not in best or score > best[ex][0]:
      best[ex] = (score, bool(correct))
  acc = np.mean([c for _, c in best.values()])
  return {"accuracy": 100.0 * float(acc)}


def exact_match_accuracy(targets, predictions) -> dict[str, float]:
  """Exact string match accuracy (%), ignoring surrounding whitespace."""
  if len(targets) != len(predictions):
    raise PreprocessorError(
        f"exact_match_accuracy: {len(targets)} targets vs {len(predictions)} "
        "predictions")
  if not targets:
    raise PreprocessorError("exact_match_accuracy: no examples")
  hits = [_text(t).strip() == _text(p).strip()
          for t, p in zip(targets, predictions)]
  return {"accuracy": 100.0 * float(np.mean(hits))}
