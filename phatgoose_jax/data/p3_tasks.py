"""seqio Tasks for the 36 T0 held-in (P3) datasets and their T0 mixture.

Paper: Muqeeth et al., ICML 2024, Sec. 4.1 ("T0 held-in": one LoRA expert per
dataset, trained on every non-ignored template). Data: the already-rendered
prompts of bigscience/P3, one config per (dataset, template), each row holding
`inputs_pretokenized`, `targets_pretokenized` and (for classification
templates) `answer_choices`; `*_score_eval` configs add `idx` [2] (example,
choice), `is_correct` and `weight`. The official code renders promptsource
templates itself; reading P3 gives the same prompts for the published
templates (see docs/datasets.md for the caveats).

Sources (`source=` in `register_p3_tasks`, gin `P3_SOURCE`):
  'tfrecord'  P3's own files: `<p3_dir>/data/<config>/<split>.tfrecord-*`
              (tf.train.Example; bool/int32 stored as int64; per-split row
              counts in `stats.<split>.json` "examples"), as bigscience/P3
              ships them.
  'jsonl'     local export: `<data_dir>/p3/<config>/<split>.jsonl` (or
              `<split>-*.jsonl` shards), one P3 row per line.
  'parquet'   same layout with `.parquet` files.
  'hf'        `datasets.load_dataset('bigscience/P3', <config>)` (online or a
              populated HF cache).

Design choice: one seqio Task per dataset whose source reads all of the
dataset's template configs and interleaves them round-robin (template 0 row 0,
template 1 row 0, ...; a template that runs out is skipped). On the train
split each template is capped at `cap // num_templates` rows, so a dataset
gives at most `cap` (example, template) pairs (PHATGOOSE's
`max_examples_per_dataset = 500_000`). The multitask mixture `p3_multitask`
weights dataset d by `num_templates * t0_mixture_rate(train_size, n)` (T0's
per-template rule summed over the dataset's templates); `train_size` is
`num_train_examples[key]` when given, else the row count of the dataset's
first template config (stats file / rows), computed lazily when the mixture
is first sampled.

TREC: PHATGOOSE replaces P3's TREC templates with a template of its own
(catalog `custom_template=True`); P3 data cannot reproduce it, so the TREC
task reads P3's 18 TREC configs instead (a documented deviation).

Rows are read lazily: registration never touches the data, so all tasks can be
registered on a machine that holds only some of them; a missing file raises
`P3DataError` naming the config, split and path when the data is read.
No tensors with named axes here, so no einsum letters are used.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import re
from typing import Any, Iterator, Mapping, Optional, Sequence

import gin
import numpy as np

from phatgoose_jax.data import preprocessors as prep
from phatgoose_jax.data import registry
from phatgoose_jax.data.catalog import p3 as p3_catalog

SOURCE_KINDS = ("tfrecord", "jsonl", "parquet", "hf")
SPLITS = ("train", "validation", "test")
P3_HF_PATH = "bigscience/P3"
TASK_PREFIX = "p3_"
MIXTURE_NAME = "p3_multitask"


class P3DataError(ValueError):
  """P3 rows cannot be found or are malformed (names config, split, path)."""


def task_name(key: str, prefix: str = TASK_PREFIX) -> str:
  """seqio name of a dataset task, e.g. 'p3_ag_news'."""
  return prefix + re.sub(r"[^\w\d\.\:_]+", "_", key)


def dataset_templates(spec: p3_catalog.DatasetSpec) -> tuple[str, ...]:
  """The P3 configs a dataset task reads (TREC: all P3 configs, see above)."""
  return spec.all_p3_configs if spec.custom_template else spec.templates


# ----------------------------------------------------------------------------
# reading one P3 config
# ----------------------------------------------------------------------------
def _normalize_row(row: Mapping[str, Any], score_eval: bool,
                   where: str) -> dict[str, Any]:
  """Uniform P3 row: strings, answer_choices list, score-eval fields typed."""
  for k in ("inputs_pretokenized", "targets_pretokenized"):
    if k not in row:
      raise P3DataError(f"{where}: row has no field {k!r} (has {sorted(row)})")
  for k in ("inputs_pretokenized", "targets_pretokenized"):
    if not isinstance(row[k], (str, bytes)):
      raise P3DataError(f"{where}: field {k!r} must be a string, got {row[k]!r}")
  out = {"inputs_pretokenized": _as_str(row["inputs_pretokenized"]),
         "targets_pretokenized": _as_str(row["targets_pretokenized"]),
         "answer_choices": [_as_str(c) for c in (row.get("answer_choices") or [])]}
  if score_eval:
    for k in ("idx", "is_correct"):
      if k not in row:
        raise P3DataError(f"{where}: score-eval row has no field {k!r}")
    idx = [int(i) for i in row["idx"]]
    if len(idx) != 2:
      raise P3DataError(f"{where}: field 'idx' must have 2 entries, got {idx}")
    out["idx"] = idx
    if not isinstance(row["is_correct"], (bool, np.bool_)) and row["is_correct"] not in (0, 1):
      raise P3DataError(f"{where}: field 'is_correct' must be a boolean, got "
                        f"{row['is_correct']!r}")  # bool("false") would be True
    out["is_correct"] = bool(row["is_correct"])
    out["weight"] = float(row.get("weight", 1.0))
  return out


def _as_str(v: Any) -> str:
  return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def _signature(score_eval: bool):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  sig = {"inputs_pretokenized": tf.TensorSpec([], tf.string),
         "targets_pretokenized": tf.TensorSpec([], tf.string),
         "answer_choices": tf.TensorSpec([None], tf.string)}
  if score_eval:
    sig.update(idx=tf.TensorSpec([2], tf.int32),
               is_correct=tf.TensorSpec([], tf.bool),
               weight=tf.TensorSpec([], tf.float32))
  return sig


@gin.configurable(module="phatgoose_jax.data.p3_tasks")
class P3Reader:
  """Reads single P3 configs from one kind of storage.

  Args:
    kind: one of SOURCE_KINDS.
    data_dir: root of local exports (`<data_dir>/p3/<config>/...`) for
      'jsonl' / 'parquet'.
    p3_dir: root of a bigscience/P3 checkout (holding `data/`) for 'tfrecord'.
    hf_path: dataset path for 'hf'.
    hf_kwargs: extra `datasets.load_dataset` arguments (e.g. cache_dir).
  """

  def __init__(self, kind: str = "tfrecord", data_dir: Optional[str] = None,
               p3_dir: Optional[str] = None, hf_path: str = P3_HF_PATH,
               hf_kwargs: Optional[Mapping[str, Any]] = None):
    if kind not in SOURCE_KINDS:
      raise P3DataError(f"P3 source kind {kind!r} is not one of {SOURCE_KINDS}")
    if kind == "tfrecord" and not p3_dir:
      raise P3DataError("P3 source 'tfrecord' needs p3_dir (P3_DIR in the data gin: the "
                        "bigscience/P3 checkout holding data/<config>/)")
    if kind in ("jsonl", "parquet") and not data_dir:
      raise P3DataError(f"P3 source {kind!r} needs data_dir (DATA_DIR in the data gin: files "
                        "under <data_dir>/p3/<config>/<split>.<ext>)")
    self.kind, self.data_dir, self.p3_dir = kind, data_dir, p3_dir
    self.hf_path, self.hf_kwargs = hf_path, dict(hf_kwargs or {})

  # -- layout ----------------------------------------------------------------
  def config_dir(self, config: str) -> str:
    if self.kind == "tfrecord":
      return os.path.join(self.p3_dir, "data", config)
    return os.path.join(self.data_dir, "p3", config)

  def files(self, config: str, split: str) -> list[str]:
    """Files of one config split, sorted; [] when none (or kind 'hf')."""
    if self.kind == "hf":
      return []
    d = self.config_dir(config)
    if self.kind == "tfrecord":
      pats = [os.path.join(d, f"{split}.tfrecord-*")]
    else:
      ext = self.kind
      pats = [os.path.join(d, f"{split}.{ext}"), os.path.join(d, f"{split}-*.{ext}")]
    return sorted({f for p in pats for f in glob.glob(p)})

  def _require_files(self, config: str, split: str) -> list[str]:
    files = self.files(config, split)
    if not files:
      ext = "tfrecord-*" if self.kind == "tfrecord" else self.kind
      raise P3DataError(
          f"P3 config {config!r} split {split!r}: no file "
          f"{os.path.join(self.config_dir(config), split)}.{ext} (source "
          f"{self.kind!r})")
    return files

  def discover_configs(self, prefix: str) -> list[str]:
    """Config names under the local root starting with `prefix` (no score-eval)."""
    if self.kind == "hf":
      raise P3DataError(
          f"cannot list P3 configs starting with {prefix!r} from source 'hf'; "
          "use a local source (tfrecord/jsonl/parquet)")
    root = os.path.dirname(self.config_dir("x"))
    names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(root, prefix + "*")))
    return [n for n in names if not n.endswith("_score_eval")]

  # -- rows ------------------------------------------------------------------
  def num_rows(self, config: str, split: str) -> int:
    """Row count of a config split (stats file when present, else counted)."""
    if self.kind == "tfrecord":
      stats = os.path.join(self.config_dir(config), f"stats.{split}.json")
      if os.path.exists(stats):
        with open(stats, encoding="utf-8") as f:
          return int(json.load(f)["examples"])
    return sum(1 for _ in self.rows(config, split))

  def rows(self, config: str, split: str, score_eval: bool = False
           ) -> Iterator[dict[str, Any]]:
    """Normalized python rows of one config split (not for 'tfrecord')."""
    where = f"P3 config {config!r} split {split!r}"
    if self.kind == "tfrecord":
      for ex in self.dataset(config, split, score_eval).as_numpy_iterator():
        ex = dict(ex)
        ex["answer_choices"] = list(ex["answer_choices"])
        if score_eval:
          ex["idx"] = list(ex["idx"])
        yield _normalize_row(ex, score_eval, where)
      return
    if self.kind == "hf":
      try:
        import datasets  # pylint: disable=g-import-not-at-top
      except ImportError as e:
        raise P3DataError(
            f"{where}: source 'hf' needs the package 'datasets' (pip install "
            "datasets) or a local source") from e
      it = datasets.load_dataset(self.hf_path, config, split=split, **self.hf_kwargs)
    else:
      from phatgoose_jax.data import sources  # pylint: disable=g-import-not-at-top
      files = self._require_files(config, split)
      it = (sources.read_jsonl_rows(files) if self.kind == "jsonl"
            else sources.read_parquet_rows(files))
    for row in it:
      yield _normalize_row(row, score_eval, where)

  def dataset(self, config: str, split: str, score_eval: bool = False):
    """tf.data.Dataset of uniform P3 rows of one config split."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    if self.kind != "tfrecord":
      if self.kind != "hf":
        self._require_files(config, split)  # a named error here, not inside tf.data
      return tf.data.Dataset.from_generator(
          lambda: self.rows(config, split, score_eval),
          output_signature=_signature(score_eval))
    files = self._require_files(config, split)
    desc = {
        "inputs_pretokenized": tf.io.FixedLenFeature([], tf.string),
        "targets_pretokenized": tf.io.FixedLenFeature([], tf.string),
        "answer_choices": tf.io.FixedLenSequenceFeature([], tf.string,
                                                         allow_missing=True),
    }
    if score_eval:
      desc.update(idx=tf.io.FixedLenFeature([2], tf.int64),
                  is_correct=tf.io.FixedLenFeature([], tf.int64),
                  weight=tf.io.FixedLenFeature([], tf.float32, default_value=1.0))

    def parse(pb):
      ex = tf.io.parse_single_example(pb, desc)
      if score_eval:
        ex["idx"] = tf.cast(ex["idx"], tf.int32)
        ex["is_correct"] = tf.cast(ex["is_correct"], tf.bool)
      return ex
    return tf.data.TFRecordDataset(files).map(parse)


def interleave_round_robin(datasets: Sequence[Any]):
  """Round-robin over datasets, skipping those that are exhausted."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if len(datasets) == 1:
    return datasets[0]
  choice = tf.data.Dataset.range(len(datasets)).repeat()
  return tf.data.Dataset.choose_from_datasets(
      list(datasets), choice, stop_on_empty_dataset=False)


_ROW_COUNTS: dict = {}  # (count_key) -> rows, so a process counts each template once


def sample_rows(ds, k: int, seed_text: str, count_key: Optional[Any] = None):
  """``k`` rows of ``ds`` drawn uniformly without replacement (all of them if it has <= k), in
  their original order.

  As the official ``P3Dataset.truncate_dataset`` (``rng.choice(n, size=cap, replace=False)``), not
  the first k rows; the draw is seeded by ``seed_text`` (the template config), so a run is
  reproducible, but it is not the official draw. The row count comes from the dataset's
  cardinality, or one counting pass (cached per ``count_key`` for the process); each epoch then
  reads the rows up to the last one kept (the official code reads rows at random, which TFRecord
  files cannot).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  n = int(ds.cardinality().numpy())
  if n == int(tf.data.INFINITE_CARDINALITY):
    raise P3DataError(f"{seed_text}: cannot sample {k} rows of an infinite dataset")
  if n < 0:  # unknown: count once
    if count_key is not None and count_key in _ROW_COUNTS:
      n = _ROW_COUNTS[count_key]
    else:
      n = int(ds.reduce(np.int64(0), lambda count, _: count + 1).numpy())
      if count_key is not None:
        _ROW_COUNTS[count_key] = n
  if n <= k:
    return ds
  seed = int.from_bytes(hashlib.sha256(seed_text.encode("utf-8")).digest()[:8], "little")
  picked = np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))
  keep = np.zeros((int(picked[-1]) + 1,), np.bool_)
  keep[picked] = True
  keep = tf.constant(keep)
  return (ds.take(int(picked[-1]) + 1).enumerate().filter(lambda i, _: keep[i])
          .map(lambda _, ex: ex))


def eval_templates(spec: p3_catalog.DatasetSpec) -> tuple[str, ...]:
  """The templates a dataset's validation reads: the original-task ones (all of them where the
  official eval uses all, or where they were not collected), minus the eval-only ignores."""
  base = (spec.templates if spec.eval_all_templates or not spec.original_task_templates
          else spec.original_task_templates)
  drop = set(spec.eval_ignored_templates)
  return tuple(t for t in dataset_templates(spec) if t in set(base) and t not in drop) or tuple(
      t for t in dataset_templates(spec) if t not in drop)


def _concatenate(parts):
  """The datasets one after the other (templates in order)."""
  return functools.reduce(lambda a, b: a.concatenate(b), parts)


def score_eval_rows(reader: P3Reader, configs: Sequence[str], split: str,
                    max_examples: Optional[int] = None, template_field: bool = False):
  """P3 ``_score_eval`` rows of several template configs, concatenated: one row per (example,
  choice) with ``idx`` = [example * num_templates + template, choice] (distinct groups per
  (example, template)), ``is_correct`` and stripped targets; at most ``max_examples`` examples
  per template (the first ones); ``template`` (int32) added with ``template_field``."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  n = len(configs)
  parts = []
  for t, config in enumerate(configs):
    ds = reader.dataset(config, split, score_eval=True)
    if max_examples is not None:
      ds = ds.filter(lambda ex: ex["idx"][0] < max_examples)

    def fn(ex, t=t):
      idx = ex["idx"]
      row = {"inputs": ex["inputs_pretokenized"],
             "targets": tf.strings.strip(ex["targets_pretokenized"]),
             "idx": tf.stack([idx[0] * n + t, idx[1]]), "is_correct": ex["is_correct"]}
      if template_field:
        row["template"] = tf.constant(t, tf.int32)
      return row
    parts.append(ds.map(fn))
  return _concatenate(parts)


def _validation_rows(reader: P3Reader, spec: p3_catalog.DatasetSpec):
  """The validation split of a P3 expert task: the catalog's eval split (e.g. ag_news 'test').

  'mc' datasets: P3's ``<template>_score_eval`` rows (`score_eval_rows`, as the T0 held-out
  tasks), at most ``eval_max_examples`` examples per template (the first ones; the official
  code draws them at random). 'gen' datasets: the plain rows of those templates.
  """
  configs = eval_templates(spec)
  cap = spec.eval_max_examples
  if spec.eval_interface == "mc":
    return score_eval_rows(reader, [c + "_score_eval" for c in configs], spec.eval_split, cap)
  parts = []
  for config in configs:
    ds = reader.dataset(config, spec.eval_split)
    parts.append((ds.take(cap) if cap is not None else ds).map(
        lambda ex: {"inputs": ex["inputs_pretokenized"], "targets": ex["targets_pretokenized"]}))
  return _concatenate(parts)


def templates_source(reader: P3Reader, configs: Sequence[str],
                     cap: Optional[int] = None, splits: Sequence[str] = SPLITS,
                     name: str = "p3", eval_spec: Optional[p3_catalog.DatasetSpec] = None):
  """seqio source of text rows {inputs, targets, answer_choices} over configs.

  Args:
    reader: where the configs are read from.
    configs: P3 config names, or a callable returning them at read time.
    cap: train-split cap on rows per dataset, split evenly over templates; each template keeps
      a seeded uniform sample of its rows (`sample_rows`).
    splits: the declared splits.
    name: used in error messages.
    eval_spec: with it, split "validation" reads the dataset's evaluation rows
      (`_validation_rows`), which the task's metric scores.
  """
  import seqio  # pylint: disable=g-import-not-at-top

  def dataset_fn(split: str, shuffle_files: bool, seed: Optional[int] = None):
    del shuffle_files, seed  # Deterministic order; seqio shuffles rows.
    if eval_spec is not None and split == "validation":
      return _validation_rows(reader, eval_spec)
    names = list(configs() if callable(configs) else configs)
    if not names:
      raise P3DataError(f"{name}: no P3 template config to read")
    per_template = None
    if cap is not None and split == "train":
      per_template = max(1, int(cap) // len(names))
    parts = []
    for c in names:
      ds = reader.dataset(c, split)
      if per_template is not None:
        ds = sample_rows(ds, per_template, seed_text=c,
                         count_key=(name, c, split, tuple(reader.files(c, split))
                                    if hasattr(reader, "files") else None))
      parts.append(ds)
    ds = interleave_round_robin(parts)
    return ds.map(lambda ex: {"inputs": ex["inputs_pretokenized"],
                              "targets": ex["targets_pretokenized"],
                              "answer_choices": ex["answer_choices"]})
  return seqio.FunctionDataSource(dataset_fn, splits=list(splits))


def output_features(vocabulary):
  import seqio  # pylint: disable=g-import-not-at-top
  return {"inputs": seqio.Feature(vocabulary, add_eos=True),
          "targets": seqio.Feature(vocabulary, add_eos=True)}




def text_preprocessors():
  """tokenize, trim keeping EOS (PHATGOOSE recipe).

  Blank inputs/targets are not filtered here: `pipeline.get_dataset` drops every example whose
  inputs or targets hold no token besides EOS, and `pipeline.data_statistics` counts them.
  """
  import seqio  # pylint: disable=g-import-not-at-top
  return [seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim]


def validation_metrics(spec: p3_catalog.DatasetSpec) -> dict:
  """``metric_fns`` / ``postprocess_fn`` of a P3 expert task's validation split, as the official
  metric list of the dataset (``r-three/phatgoose: src/data/metrics.py``): rank classification
  accuracy for 'mc' datasets; for generative ones every listed metric of ``squad`` (exact match
  and F1, `phatgoose_jax.data.squad`), ``bleu`` (corpus BLEU, `phatgoose_jax.data.bleu`) and
  ``rouge`` (ROUGE-L only); exact match where the list names none of these. The dataset's
  validation score is the mean of the values reported (`training.task_validation`), as the
  official scorer's dict is averaged."""
  from phatgoose_jax.data import bleu as bleu_lib  # pylint: disable=g-import-not-at-top
  from phatgoose_jax.data import rouge as rouge_lib  # pylint: disable=g-import-not-at-top
  from phatgoose_jax.data import squad as squad_lib  # pylint: disable=g-import-not-at-top
  if spec.eval_interface == "mc":
    return dict(metric_fns=[prep.rank_classification_accuracy],
                postprocess_fn=prep.rank_classification_postprocessor)
  by_name = {"squad": squad_lib.squad, "bleu": bleu_lib.bleu, "rouge": rouge_lib.rouge_l_only}
  metrics = [by_name[m] for m in spec.eval_metrics if m in by_name]
  return dict(metric_fns=metrics or [prep.exact_match_accuracy],
              postprocess_fn=_text_postprocessor)


def set_validation_decode_length(task: str, spec: p3_catalog.DatasetSpec) -> None:
  """Records a generative dataset's official validation budget, ``max_gen_length - 1`` decoded
  tokens (`catalog.p3.P3_EVAL_MAX_GEN_LENGTH`); choice datasets decode nothing."""
  length = p3_catalog.P3_EVAL_MAX_GEN_LENGTH.get(spec.key)
  registry.set_decode_length(task, length - 1 if spec.eval_interface == "gen" and length
                             else None)


def _text_postprocessor(output, example=None, is_target=False):
  del example, is_target
  return output.decode("utf-8") if isinstance(output, bytes) else str(output)


def add_task(name: str, source, vocabulary, metric_fns=(), postprocess_fn=None,
             preprocessors=None) -> str:
  """Adds (or replaces) a seqio Task; returns its name."""
  import seqio  # pylint: disable=g-import-not-at-top
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(
      name, source=source,
      preprocessors=list(preprocessors if preprocessors is not None
                         else text_preprocessors()),
      output_features=output_features(vocabulary),
      postprocess_fn=postprocess_fn, metric_fns=list(metric_fns))
  return name


def add_mixture(name: str, tasks, default_rate=1.0) -> str:
  """Adds (or replaces) a seqio Mixture; returns its name."""
  import seqio  # pylint: disable=g-import-not-at-top
  if name in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove(name)
  seqio.MixtureRegistry.add(name, list(tasks), default_rate=default_rate)
  return name


def _t0_rate(task, reader: P3Reader, spec: p3_catalog.DatasetSpec,
             num_train_examples: Optional[int]) -> float:
  """T0's per-template rate summed over the dataset's templates."""
  del task
  configs = dataset_templates(spec)
  size = num_train_examples
  if size is None:
    size = reader.num_rows(configs[0], "train")
  return float(len(configs) * p3_catalog.t0_mixture_rate(size, len(configs)))


def make_reader(source: str, data_dir: Optional[str], p3_dir: Optional[str],
                hf_kwargs: Optional[Mapping[str, Any]] = None) -> P3Reader:
  if source == "tfrecord" and not p3_dir and data_dir:
    p3_dir = os.path.join(data_dir, "P3")  # Default checkout location.
  return P3Reader(source, data_dir=data_dir, p3_dir=p3_dir, hf_kwargs=hf_kwargs)


@gin.configurable(module="phatgoose_jax.data.p3_tasks")
def register_p3_tasks(vocabulary=gin.REQUIRED, source: str = "tfrecord",
                      data_dir: Optional[str] = None,
                      p3_dir: Optional[str] = None,
                      cap: Optional[int] = p3_catalog.MAX_EXAMPLES_PER_DATASET,
                      num_train_examples: Optional[Mapping[str, int]] = None,
                      prefix: str = TASK_PREFIX,
                      mixture_name: str = MIXTURE_NAME,
                      hf_kwargs: Optional[Mapping[str, Any]] = None) -> list[str]:
  """Registers the 36 P3 dataset Tasks and their T0-rate mixture (idempotent).

  Args:
    vocabulary: seqio vocabulary for inputs and targets.
    source: 'tfrecord', 'jsonl', 'parquet' or 'hf' (module docstring).
    data_dir: root of local exports (`<data_dir>/p3/<config>/`); for
      'tfrecord' without `p3_dir`, `<data_dir>/P3` is the checkout.
    p3_dir: bigscience/P3 checkout (holding `data/`) for 'tfrecord'.
    cap: max (example, template) rows per dataset on the train split
      (None: uncapped).
    num_train_examples: dataset key -> train size for the mixing rates.
    prefix: task name prefix.
    mixture_name: name of the multitask mixture of all 36 tasks.
    hf_kwargs: extra `datasets.load_dataset` arguments for 'hf'.

  Returns:
    The 36 task names (catalog order), then the mixture name.
  """
  if vocabulary is gin.REQUIRED or vocabulary is None:
    raise P3DataError("register_p3_tasks: vocabulary is not set (VOCABULARY)")
  reader = make_reader(source, data_dir, p3_dir, hf_kwargs)
  sizes = dict(num_train_examples or {})
  unknown = sorted(set(sizes) - set(p3_catalog.all_p3_keys()))
  if unknown:
    raise P3DataError(f"num_train_examples: unknown dataset key(s) {unknown}")
  names, rates = [], []
  for spec in p3_catalog.P3_DATASETS:
    name = add_task(task_name(spec.key, prefix),
                    templates_source(reader, dataset_templates(spec), cap,
                                     name=f"P3 dataset {spec.key!r}", eval_spec=spec),
                    vocabulary, **validation_metrics(spec))
    set_validation_decode_length(name, spec)
    names.append(name)
    rates.append((name, functools.partial(
        _t0_rate, reader=reader, spec=spec,
        num_train_examples=sizes.get(spec.key))))
  add_mixture(mixture_name, rates)
  return names + [mixture_name]


@gin.configurable(module="phatgoose_jax.data.p3_tasks")
def task_module(register=None) -> str:
  """Registers the P3 tasks (gin bindings of `register_p3_tasks`) and returns
  this module's name, for `MIXTURE_OR_TASK_MODULE = @...task_module()`.

  A gin file binding `register_p3_tasks.*` imports this module while it is
  parsed, before the bindings exist, so registration cannot happen at import;
  evaluating this reference when the trainer reads MIXTURE_OR_TASK_MODULE does
  it after parsing.
  """
  (register or register_p3_tasks)()
  return __name__
