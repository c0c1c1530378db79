"""seqio Tasks for the 11 T0 held-out evaluations (rank classification).

Paper: Muqeeth et al., ICML 2024, Sec. 4.1 (T0 held-out: RTE, HellaSwag, COPA,
WiC, WinoGrande, CB, StoryCloze, ANLI R1/R2/R3, WSC), following T0 (Sanh et
al. 2022): every example is rendered with every evaluated template of the
catalog, each (example, template) is one rank-classification question, and a
dataset's accuracy is the mean over (example, template) pairs; the T0HO score
is the unweighted mean of the 11 accuracies (`t0_heldout_average`).

Rows come from P3's `<template>_score_eval` configs (read with
`p3_tasks.P3Reader`: tfrecord / jsonl / parquet / hf), one row per (example,
answer choice) with `idx` = [example, choice] and `is_correct`. One Task per
evaluation reads all its templates' configs; to keep (example, template) pairs
distinct, the Task rewrites the group index as
`idx[0] = example * num_templates + template` (the choice index is kept) and
adds `template` (int32). The seqio split is always "validation"; it reads the
catalog's split (`dev_rN` of ANLI is P3's "validation" of the `_rN` configs;
StoryCloze reads "test" as PHATGOOSE does).

Scoring: the evaluation helper gives each row the mean token log-likelihood of
its target *including EOS* (equivalently minus the mean token NLL); the
postprocessor maps targets to (group, choice, is_correct) and
`rank_classification_accuracy` argmaxes the score within each group.
No tensors with named axes here, so no einsum letters are used.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Union

import gin

from phatgoose_jax.data import p3_tasks
from phatgoose_jax.data import preprocessors as prep
from phatgoose_jax.data.catalog import t0_heldout as catalog

TASK_PREFIX = "t0_heldout_"
MIXTURE_NAME = "t0_heldout"
EVAL_SPLIT = "validation"


class HeldoutDataError(ValueError):
  """Held-out rows or results are missing or malformed."""


def task_name(key: str, prefix: str = TASK_PREFIX) -> str:
  return prefix + key


def p3_split(spec: catalog.HeldoutSpec) -> str:
  """P3 split name holding the catalog split ('dev_r1' -> 'validation')."""
  return "validation" if spec.split.startswith("dev_r") else spec.split


def heldout_source(reader: p3_tasks.P3Reader, spec: catalog.HeldoutSpec):
  """seqio source of score-eval rows of every template of one evaluation."""
  import seqio  # pylint: disable=g-import-not-at-top
  configs = spec.score_eval_configs

  def dataset_fn(split: str, shuffle_files: bool, seed: Optional[int] = None):
    del shuffle_files, seed
    if split != EVAL_SPLIT:
      raise HeldoutDataError(f"{spec.key}: only split {EVAL_SPLIT!r} exists")
    return p3_tasks.score_eval_rows(reader, configs, p3_split(spec), template_field=True)
  return seqio.FunctionDataSource(dataset_fn, splits=[EVAL_SPLIT])


@gin.configurable(module="phatgoose_jax.data.t0_tasks")
def register_t0_heldout_tasks(vocabulary=gin.REQUIRED, source: str = "tfrecord",
                              data_dir: Optional[str] = None,
                              p3_dir: Optional[str] = None,
                              prefix: str = TASK_PREFIX,
                              mixture_name: str = MIXTURE_NAME,
                              hf_kwargs: Optional[Mapping[str, Any]] = None
                              ) -> list[str]:
  """Registers the 11 held-out Tasks (catalog order) and their mixture.

  Args: as `p3_tasks.register_p3_tasks` (no cap: evaluation reads all rows).

  Returns:
    The 11 task names, then the mixture name (equal rates; for evaluating all
    with one call, not for training).
  """
  if vocabulary is gin.REQUIRED or vocabulary is None:
    raise HeldoutDataError("register_t0_heldout_tasks: vocabulary is not set")
  reader = p3_tasks.make_reader(source, data_dir, p3_dir, hf_kwargs)
  names = []
  for spec in catalog.T0_HELDOUT:
    names.append(p3_tasks.add_task(
        task_name(spec.key, prefix), heldout_source(reader, spec), vocabulary,
        metric_fns=[prep.rank_classification_accuracy],
        postprocess_fn=prep.rank_classification_postprocessor,
        preprocessors=p3_tasks.text_preprocessors()))  # Blank choices are kept (no filtering).
  p3_tasks.add_mixture(mixture_name, names)
  return names + [mixture_name]


def t0_heldout_average(results: Mapping[str, Union[float, Mapping[str, float]]],
                       prefix: str = TASK_PREFIX) -> float:
  """Unweighted mean accuracy over the 11 held-out evaluations (T0HO score).

  Args:
    results: per evaluation, keyed by catalog key ('rte') or task name
      ('t0_heldout_rte'), an accuracy or a metrics dict with 'accuracy'.

  Raises:
    HeldoutDataError: naming missing or unknown evaluations.
  """
  accs: dict[str, float] = {}
  keys = catalog.all_heldout_keys()
  for name, value in results.items():
    key = name[len(prefix):] if name.startswith(prefix) else name
    if key not in keys:
      raise HeldoutDataError(
          f"t0_heldout_average: unknown evaluation {name!r}; expected {keys}")
    if isinstance(value, Mapping):
      if "accuracy" not in value:
        raise HeldoutDataError(f"t0_heldout_average: {name!r} has no 'accuracy'")
      value = value["accuracy"]
    accs[key] = float(value)
  missing = [k for k in keys if k not in accs]
  if missing:
    raise HeldoutDataError(f"t0_heldout_average: missing evaluation(s) {missing}")
  return sum(accs.values()) / len(keys)


@gin.configurable(module="phatgoose_jax.data.t0_tasks")
def task_module(register=None) -> str:
  """Registers the held-out tasks from gin; returns this module's name (see
  `p3_tasks.task_module`)."""
  (register or register_t0_heldout_tasks)()
  return __name__
