"""seqio Tasks for the 166 experts of PHATGOOSE's FLAN setting.

Paper: Muqeeth et al., ICML 2024, Sec. 4.1 (FLAN setting); expert list and
order: `catalog.flan` (r-three/phatgoose `scripts/concatenate.py`).

Groups (`FlanExpertSpec.group`):
  'flan2021', 'dialog'  rows of the Open-Orca/FLAN dump whose `_task_name` is
      one of the expert's `task_names`, zero-shot templates only
      (`_template_type` containing 'zs_opt'/'zs_noopt'), blank inputs/targets
      dropped; then, as r-three/phatgoose `src/data/flat.py` does, the rows are
      permuted with `np.random.RandomState(1234)`, the first
      `min(int(0.1 n), 10_000)` form "validation" and the rest (capped at
      500_000) "train". Dump fields: `inputs`, `targets`, `_template_type`,
      `_task_name` (others ignored).
  'niv2'  a whole NIv2 category. The category -> `_task_name` lists are not
      public (catalog `verified=False`) and the dump has no category field, so
      these tasks are registered but reading them raises `FlanDataError`
      naming the missing list, unless `niv2_task_names[category]` is given
      (gin) or `niv2_trust_files=True` says the files matched by
      `file_pattern` for the category hold only that category (the official
      per-category export `FLANV2/NIV2/<Category>/`).
  'p3'  P3 datasets, read like `p3_tasks` (36 with the catalog templates; the
      7 'add1' datasets wsc.fixed/copa/hellaswag/wic/race_high/race_middle/
      web_questions with every non-score-eval P3 config found locally under
      their config prefix, since the catalog has no template list for them).

Validation (what an expert run keeps its best checkpoint by): FLAN2021, NIv2
and Dialog experts decode greedily for at most `max_gen_length - 1` tokens
(`catalog.flan_gen_lengths`, official per-expert values, through
`registry.decode_length`) and score ROUGE-L, as `flanv2_t5xl.gin`; the 36 P3
experts validate exactly as in the P3 setting (`p3_tasks.validation_metrics`,
the catalog's eval split); the 7 add1 P3 datasets, for which the official
repository has no evaluation entry, by exact match on their validation split.

Files: `file_pattern` (formatted with `data_dir`, `path` = the official
`dataset_path` joined by '/', `ext`, `key`) selects the jsonl/parquet files
an expert reads; the default `{data_dir}/flan/{path}/*.{ext}` is the official
offline layout (one folder per expert). Pointing it at the whole dump (e.g.
`{data_dir}/flan_dump/*.parquet`) also works, because rows are always filtered
by `_task_name`. `source='hf'` streams `Open-Orca/FLAN` (train) and filters it.
All rows of an expert are held in memory to split them (as the official code).
No tensors with named axes here, so no einsum letters are used.
"""

from __future__ import annotations

import glob
import re
from typing import Any, Iterator, Mapping, Optional, Sequence

import gin
import numpy as np

from phatgoose_jax.data import p3_tasks
from phatgoose_jax.data import registry
from phatgoose_jax.data import preprocessors as prep
from phatgoose_jax.data import rouge as rouge_lib
from phatgoose_jax.data.catalog import flan as catalog
from phatgoose_jax.data.catalog import p3 as p3_catalog
from phatgoose_jax.data.catalog.flan_gen_lengths import FLAN_EVAL_MAX_GEN_LENGTH

TASK_PREFIX = "flan_"
MIXTURE_NAME = "flan_multitask"
SPLITS = ("train", "validation")
DEFAULT_FILE_PATTERN = "{data_dir}/flan/{path}/*.{ext}"
FLAN_FIELDS = ("inputs", "targets", "_template_type", "_task_name")


class FlanDataError(ValueError):
  """FLAN rows cannot be read for an expert (names the expert and the gap)."""


def task_name(key: str, prefix: str = TASK_PREFIX) -> str:
  """seqio name: 'flan2021/ai2_arc/ARC-Easy:1.0.0' -> 'flan_flan2021_ai2_arc_ARC_Easy:1.0.0'."""
  return prefix + re.sub(r"[^\w\d\.\:]+", "_", key).strip("_")


def split_rows(rows: Sequence[Any], split: str,
               seed: int = catalog.FLAN_SHUFFLE_SEED,
               max_train: Optional[int] = catalog.FLAN_MAX_TRAIN_EXAMPLES) -> list:
  """The official shuffle / hold-out split of one expert's filtered rows."""
  if split not in SPLITS:
    raise FlanDataError(f"FLAN split must be one of {SPLITS}, got {split!r}")
  order = np.random.RandomState(seed).permutation(len(rows))
  n_eval = catalog.flan_eval_size(len(rows))
  picked = order[:n_eval] if split == "validation" else order[n_eval:]
  if split == "train" and max_train is not None:
    picked = picked[:max_train]
  return [rows[i] for i in picked]


def keep_row(row: Mapping[str, Any], task_names: Optional[frozenset]) -> bool:
  """Zero-shot, non-blank and (when `task_names`) of one of those tasks."""
  if task_names is not None and row.get("_task_name") not in task_names:
    return False
  if not catalog.is_zero_shot_template_type(str(row.get("_template_type", ""))):
    return False
  return not prep.is_empty_example(row)


class FlanRowReader:
  """Reads, filters and splits the FLAN dump rows of one expert."""

  def __init__(self, spec: catalog.FlanExpertSpec, source: str,
               data_dir: Optional[str], file_pattern: str,
               task_names: Optional[Sequence[str]], trust_files: bool,
               hf_kwargs: Optional[Mapping[str, Any]] = None):
    self.spec, self.source, self.data_dir = spec, source, data_dir
    self.file_pattern, self.trust_files = file_pattern, trust_files
    self.task_names = tuple(task_names) if task_names else spec.task_names
    self.hf_kwargs = dict(hf_kwargs or {})

  def _raw_rows(self) -> Iterator[Mapping[str, Any]]:
    from phatgoose_jax.data import sources  # pylint: disable=g-import-not-at-top
    where = f"FLAN expert {self.spec.key!r}"
    if self.source == "hf":
      try:
        import datasets  # pylint: disable=g-import-not-at-top
      except ImportError as e:
        raise FlanDataError(f"{where}: source 'hf' needs the package 'datasets'"
                            " or use source 'jsonl'/'parquet'") from e
      yield from datasets.load_dataset(catalog.FLAN_HF_DATASET, split="train",
                                       streaming=True, **self.hf_kwargs)
      return
    if not self.data_dir and "{data_dir}" in self.file_pattern:
      raise FlanDataError(f"{where}: data_dir is not set (FLAN_DATA_DIR)")
    pattern = self.file_pattern.format(
        data_dir=self.data_dir, path="/".join(self.spec.dataset_path or ()),
        ext=self.source, key=self.spec.key)
    files = sorted(glob.glob(pattern))
    if not files:
      raise FlanDataError(f"{where}: no file matches {pattern!r}")
    yield from (sources.read_jsonl_rows(files) if self.source == "jsonl"
                else sources.read_parquet_rows(files))

  def rows(self, split: str) -> list[dict[str, str]]:
    if not self.task_names and not self.trust_files:
      raise FlanDataError(
          f"FLAN expert {self.spec.key!r}: no verified `_task_name` list for "
          f"NIv2 category {self.spec.dataset_path[-1]!r} (catalog.flan "
          "NIV2_CATEGORIES, verified=False). Pass niv2_task_names={category: "
          "[...]} or set niv2_trust_files=True for a per-category export.")
    names = frozenset(self.task_names) if self.task_names else None
    kept = []
    for i, row in enumerate(self._raw_rows()):
      missing = [k for k in ("inputs", "targets", "_template_type") if k not in row]
      if missing:
        raise FlanDataError(
            f"FLAN expert {self.spec.key!r} row {i}: missing field(s) {missing}")
      if keep_row(row, names):
        kept.append({"inputs": str(row["inputs"]), "targets": str(row["targets"])})
    if not kept:
      raise FlanDataError(
          f"FLAN expert {self.spec.key!r}: no zero-shot row with _task_name in "
          f"{sorted(names) if names else '(any)'}")
    return split_rows(kept, split)


def flan_source(reader: FlanRowReader):
  import seqio  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  sig = {"inputs": tf.TensorSpec([], tf.string), "targets": tf.TensorSpec([], tf.string)}

  def dataset_fn(split: str, shuffle_files: bool, seed: Optional[int] = None):
    del shuffle_files, seed
    rows = reader.rows(split)  # Raises here, at read time, not at registration.
    return tf.data.Dataset.from_generator(lambda: iter(rows), output_signature=sig)
  return seqio.FunctionDataSource(dataset_fn, splits=list(SPLITS))


@gin.configurable(module="phatgoose_jax.data.flan_tasks")
def register_flan_tasks(vocabulary=gin.REQUIRED, source: str = "jsonl",
                        data_dir: Optional[str] = None,
                        file_pattern: str = DEFAULT_FILE_PATTERN,
                        p3_source: str = "tfrecord",
                        p3_data_dir: Optional[str] = None,
                        p3_dir: Optional[str] = None,
                        p3_cap: Optional[int] = p3_catalog.MAX_EXAMPLES_PER_DATASET,
                        niv2_task_names: Optional[Mapping[str, Sequence[str]]] = None,
                        niv2_trust_files: bool = False,
                        prefix: str = TASK_PREFIX,
                        mixture_name: str = MIXTURE_NAME,
                        hf_kwargs: Optional[Mapping[str, Any]] = None) -> list[str]:
  """Registers the 166 FLAN-setting expert Tasks and their mixture (idempotent).

  Args:
    vocabulary: seqio vocabulary.
    source: 'jsonl', 'parquet' or 'hf' for the FLAN dump.
    data_dir: root for `file_pattern`.
    file_pattern: see module docstring.
    p3_source, p3_data_dir, p3_dir, p3_cap: how the 43 P3 experts are read
      (`p3_tasks.register_p3_tasks`; `p3_data_dir` defaults to `data_dir`).
    niv2_task_names: NIv2 category -> Open-Orca `_task_name`s.
    niv2_trust_files: read NIv2 category files without `_task_name` filter.
    prefix: task name prefix.
    mixture_name: mixture of all 166 experts (equal rates).

  Returns:
    The 166 task names (official expert order), then the mixture name.
  """
  if vocabulary is gin.REQUIRED or vocabulary is None:
    raise FlanDataError("register_flan_tasks: vocabulary is not set")
  if source not in ("jsonl", "parquet", "hf"):
    raise FlanDataError(f"register_flan_tasks: source {source!r} is not one of "
                        "('jsonl', 'parquet', 'hf')")
  niv2 = dict(niv2_task_names or {})
  unknown = sorted(set(niv2) - set(catalog.NIV2_CATEGORIES))
  if unknown:
    raise FlanDataError(f"niv2_task_names: unknown NIv2 categories {unknown}")
  p3_reader = p3_tasks.make_reader(p3_source, p3_data_dir or data_dir, p3_dir)
  p3_keys = set(p3_catalog.all_p3_keys())
  names = []
  for spec in catalog.FLAN_EXPERTS:
    name = task_name(spec.key, prefix)
    if spec.group == "p3":
      key = spec.key.split("/", 1)[1]
      if key in p3_keys:  # validated as the P3 setting's expert (catalog eval split, metrics)
        p3_spec = p3_catalog.p3_dataset(key)
        src = p3_tasks.templates_source(p3_reader, p3_tasks.dataset_templates(p3_spec), p3_cap,
                                        name=f"FLAN P3 expert {key!r}", eval_spec=p3_spec)
        metrics = p3_tasks.validation_metrics(p3_spec)
      else:
        path, config = catalog.ADD1_P3_HF[key]
        configs = _discover(p3_reader, p3_catalog.p3_config_name(path, config, "x")[:-1])
        src = p3_tasks.templates_source(p3_reader, configs, p3_cap,
                                        name=f"FLAN P3 expert {key!r}")
        metrics = dict(metric_fns=[prep.exact_match_accuracy])
    else:
      cat = spec.dataset_path[-1] if spec.group == "niv2" else None
      reader = FlanRowReader(spec, source, data_dir, file_pattern,
                             niv2.get(cat) if cat else None,
                             niv2_trust_files and spec.group == "niv2", hf_kwargs)
      src = flan_source(reader)
      metrics = dict(metric_fns=[rouge_lib.rouge_l_only])  # official: metrics = ["rouge"]
    if name in names:
      raise FlanDataError(f"two FLAN experts map to task name {name!r}")
    gen_length = FLAN_EVAL_MAX_GEN_LENGTH.get(spec.phatgoose_name)
    # HF generate(max_length=max_gen_length) counts the decoder start token (as BIG-bench).
    registry.set_decode_length(name, gen_length - 1 if gen_length else None)
    if spec.group == "p3" and spec.key.split("/", 1)[1] in p3_keys:
      p3_tasks.set_validation_decode_length(name, p3_catalog.p3_dataset(spec.key.split("/", 1)[1]))
    names.append(p3_tasks.add_task(name, src, vocabulary, **metrics))
  p3_tasks.add_mixture(mixture_name, names)
  return names + [mixture_name]


def _discover(reader: p3_tasks.P3Reader, prefix: str):
  """Lazily lists the local P3 configs of an add1 dataset."""
  def configs():
    found = reader.discover_configs(prefix)
    if not found:
      raise FlanDataError(f"no local P3 config starts with {prefix!r} under "
                          f"{reader.config_dir('')!r}")
    return found
  return configs


@gin.configurable(module="phatgoose_jax.data.flan_tasks")
def task_module(register=None) -> str:
  """Registers the FLAN tasks from gin; returns this module's name (see
  `p3_tasks.task_module`)."""
  (register or register_flan_tasks)()
  return __name__
