"""seqio Tasks for BIG-bench Hard (22) and BIG-bench Lite (17) as PHATGOOSE runs them.

Paper: Muqeeth et al., ICML 2024, Sec. 4.1; protocol of r-three/phatgoose
`src/data/bigbench.py` (catalog: `catalog.bigbench`): the input is
`inputs + "\\nAnswer:"`; multiple-choice tasks are scored by rank
classification over `multiple_choice_targets`: for metric
'accuracy_multiple_ans' every choice whose `multiple_choice_scores` entry is 1
is correct, for 'accuracy' only the official `find_label` answer (the choice
equal to the longest target); generative tasks are decoded greedily for at
most `max_gen_length - 1` tokens (HF `generate(max_length=...)` counts the
start token) and scored by exact match against `targets[0]` (every target for
'exact_match_multiple_ans') or ROUGE against `targets[0]`, with the longest
reference as the training-style target.

Row formats read (jsonl / parquet / hf):
  tasksource/bigbench  `inputs`, `targets` (list), `multiple_choice_targets`,
                       `multiple_choice_scores`;
  lukaemon/bbh         `input`, `target` (boolean_expressions, web_of_lies use
                       the catalog's fixed answer choices).
Local layout: `<data_dir>/bigbench/<task>/<part>.<ext>` (or `<part>-*.<ext>`)
where the catalog split 'train_validation' reads parts train and validation
(concatenated, as the official code) and 'test' reads test. The seqio split
is always "validation" (= the split PHATGOOSE evaluates).

Task names: `bbh_<task>` and `bbl_<task>` (the two tasks in both suites are
registered under both names); mixtures `bbh` and `bbl` (equal rates).
No tensors with named axes here, so no einsum letters are used.
"""

from __future__ import annotations

import glob
import os
from typing import Any, Iterator, Mapping, Optional

import gin
import numpy as np

from phatgoose_jax.data import p3_tasks
from phatgoose_jax.data import preprocessors as prep
from phatgoose_jax.data import registry
from phatgoose_jax.data import rouge as rouge_lib
from phatgoose_jax.data.catalog import bigbench as catalog

EVAL_SPLIT = "validation"
ANSWER_SUFFIX = "\nAnswer:"
SUITES = {"bbh": catalog.BBH_TASKS, "bbl": catalog.BBL_TASKS}


class BigBenchDataError(ValueError):
  """BIG-bench rows cannot be found or are malformed."""


def normalize_row(row: Mapping[str, Any], task: catalog.BigBenchTask,
                  where: str) -> dict[str, Any]:
  """{inputs (with the Answer suffix), choices, choice_correct, target, references}."""
  if "inputs" in row:
    inputs = row["inputs"]
  elif "input" in row:
    inputs = row["input"]
  else:
    raise BigBenchDataError(f"{where}: row has neither 'inputs' nor 'input' "
                            f"(has {sorted(row)})")
  if "targets" in row:
    refs = [str(t) for t in row["targets"]]
  elif "target" in row:
    refs = [str(row["target"])]
  else:
    raise BigBenchDataError(f"{where}: row has neither 'targets' nor 'target'")
  out = {"inputs": str(inputs) + ANSWER_SUFFIX}
  if task.is_multiple_choice:
    choices = [str(c) for c in (row.get("multiple_choice_targets") or task.answer_choices)]
    if not choices:
      raise BigBenchDataError(f"{where}: multiple-choice task without "
                              "'multiple_choice_targets'")
    scores = row.get("multiple_choice_scores")
    if task.metric == "accuracy_multiple_ans" and scores is not None:
      correct = [float(s) == 1 for s in scores]  # official multi_label: every score == 1
    else:  # 'accuracy': the one label the official find_label gives (the longest target)
      correct = [False] * len(choices)
      label = _single_label(refs, choices, scores)
      if label is not None:
        correct[label] = True
    if len(correct) != len(choices) or not any(correct):
      raise BigBenchDataError(
          f"{where}: need one score per choice and at least one correct choice "
          f"(choices {choices}, scores {scores}, targets {refs})")
    out.update(choices=choices, choice_correct=correct)
  else:
    if not refs:
      raise BigBenchDataError(f"{where}: generative row without targets")
    # official process_data: every target counts only for 'exact_match_multiple_ans';
    # 'exact_match' and 'rouge' compare with targets[0]
    references = refs if task.metric == "exact_match_multiple_ans" else refs[:1]
    out.update(targets=max(refs, key=len), references=references)
  return out


def _single_label(refs: list, choices: list, scores) -> Optional[int]:
  """The official ``find_label`` on text: the choice equal to the longest target (the shortest
  such, then the last), else the first choice whose score is 1 (the row's own answer)."""
  target = max(refs, key=len).strip() if refs else None
  equal = [i for i, c in enumerate(choices) if c.strip() == target]
  if equal:
    return max(equal, key=lambda i: (-len(choices[i]), i))
  if scores is not None:
    ones = [i for i, x in enumerate(scores) if float(x) == 1]
    if ones:
      return ones[0]
  return None


class BigBenchReader:
  """Reads one task's evaluation rows from local files or HF."""

  def __init__(self, task: catalog.BigBenchTask, source: str,
               data_dir: Optional[str], hf_kwargs: Optional[Mapping[str, Any]] = None):
    if source not in ("jsonl", "parquet", "hf"):
      raise BigBenchDataError(f"BIG-bench source {source!r} is not one of "
                              "('jsonl', 'parquet', 'hf')")
    self.task, self.source, self.data_dir = task, source, data_dir
    self.hf_kwargs = dict(hf_kwargs or {})

  def parts(self) -> list[str]:
    return ["train", "validation"] if self.task.split == "train_validation" else [self.task.split]

  def _raw(self) -> Iterator[Mapping[str, Any]]:
    where = f"BIG-bench task {self.task.name!r}"
    if self.source == "hf":
      try:
        import datasets  # pylint: disable=g-import-not-at-top
      except ImportError as e:
        raise BigBenchDataError(f"{where}: source 'hf' needs 'datasets'") from e
      yield from datasets.load_dataset(self.task.hf_path, self.task.name,
                                       split="+".join(self.parts()), **self.hf_kwargs)
      return
    from phatgoose_jax.data import sources  # pylint: disable=g-import-not-at-top
    for files in self.part_files():
      yield from (sources.read_jsonl_rows(files) if self.source == "jsonl"
                  else sources.read_parquet_rows(files))

  def part_files(self) -> list[list[str]]:
    """The local files of each split part (source 'jsonl' / 'parquet').

    Raises:
      BigBenchDataError: no data_dir (DATA_DIR), or a part without a file. Called when the
        dataset is built, so the error is one line, not a failure inside tf.data.
    """
    where = f"BIG-bench task {self.task.name!r}"
    if not self.data_dir:
      raise BigBenchDataError(f"{where}: data_dir is not set (DATA_DIR in data/bigbench.gin)")
    d = os.path.join(self.data_dir, "bigbench", self.task.name)
    out = []
    for part in self.parts():
      pats = [os.path.join(d, f"{part}.{self.source}"), os.path.join(d, f"{part}-*.{self.source}")]
      files = sorted({f for p in pats for f in glob.glob(p)})
      if not files:
        raise BigBenchDataError(f"{where}: no file {pats[0]} (split part {part!r})")
      out.append(files)
    return out

  def rows(self) -> Iterator[dict[str, Any]]:
    for i, row in enumerate(self._raw()):
      yield normalize_row(row, self.task, f"BIG-bench task {self.task.name!r} row {i}")


def bigbench_source(reader: BigBenchReader):
  import seqio  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  s = tf.TensorSpec([], tf.string)
  if reader.task.is_multiple_choice:
    sig = {"inputs": s, "choices": tf.TensorSpec([None], tf.string),
           "choice_correct": tf.TensorSpec([None], tf.bool)}
  else:
    sig = {"inputs": s, "targets": s, "references": tf.TensorSpec([None], tf.string)}

  def dataset_fn(split: str, shuffle_files: bool, seed: Optional[int] = None):
    del shuffle_files, seed
    if split != EVAL_SPLIT:
      raise BigBenchDataError(f"{reader.task.name}: only split {EVAL_SPLIT!r} exists")
    if reader.source != "hf":
      reader.part_files()  # missing data: a named error here, not inside tf.data
    return tf.data.Dataset.from_generator(reader.rows, output_signature=sig)
  return seqio.FunctionDataSource(dataset_fn, splits=[EVAL_SPLIT])


def expand_choices(dataset):
  """One row per choice: {inputs, targets, idx [2] (example, choice), is_correct}.

  Like `preprocessors.rank_classification` but several choices may be correct
  (`choice_correct` [C] bool), as in BIG-bench's `multiple_choice_scores`.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def expand(i, ex):
    num = tf.shape(ex["choices"])[0]
    rows = {"inputs": tf.fill([num], ex["inputs"]),
            "targets": ex["choices"],
            "idx": tf.stack([tf.fill([num], tf.cast(i, tf.int32)),
                             tf.range(num, dtype=tf.int32)], axis=1),
            "is_correct": ex["choice_correct"]}
    return tf.data.Dataset.from_tensor_slices(rows)
  return dataset.enumerate().flat_map(expand)


def references_postprocessor(output, example=None, is_target=False):
  """Targets -> list of reference strings (from `references`); outputs unchanged."""
  if not is_target:
    return output.decode("utf-8") if isinstance(output, bytes) else output
  if example is None or "references" not in example:
    raise BigBenchDataError("references_postprocessor needs example field 'references'")
  return [r.decode("utf-8") if isinstance(r, bytes) else str(r)
          for r in np.asarray(example["references"]).reshape(-1)]


def exact_match_any(targets, predictions) -> dict[str, float]:
  """Exact match (%) against any reference, ignoring surrounding whitespace."""
  if len(targets) != len(predictions):
    raise BigBenchDataError(f"exact_match_any: {len(targets)} targets vs "
                            f"{len(predictions)} predictions")
  if not targets:
    raise BigBenchDataError("exact_match_any: no examples")
  hits = []
  for refs, pred in zip(targets, predictions):
    refs = [refs] if isinstance(refs, (str, bytes)) else refs
    pred = (pred.decode("utf-8") if isinstance(pred, bytes) else str(pred)).strip()
    hits.append(any((r.decode("utf-8") if isinstance(r, bytes) else str(r)).strip() == pred
                    for r in refs))
  return {"accuracy": 100.0 * float(np.mean(hits))}


def _register_one(suite: str, task: catalog.BigBenchTask, vocabulary, source,
                  data_dir, hf_kwargs) -> str:
  import seqio  # pylint: disable=g-import-not-at-top
  src = bigbench_source(BigBenchReader(task, source, data_dir, hf_kwargs))
  tok = [seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim]
  name = f"{suite}_{task.name}"
  if task.is_multiple_choice:
    return p3_tasks.add_task(
        name, src, vocabulary, metric_fns=[prep.rank_classification_accuracy],
        postprocess_fn=prep.rank_classification_postprocessor,
        preprocessors=[expand_choices] + tok)
  metric = rouge_lib.rouge if task.metric_kind == "rouge" else exact_match_any
  # Official generation_for_encdec: HF generate(max_length=max_gen_length) counts the decoder
  # start token, so at most max_gen_length - 1 tokens are generated.
  registry.set_decode_length(name, (task.max_gen_length - 1) if task.max_gen_length else None)
  return p3_tasks.add_task(name, src, vocabulary, metric_fns=[metric],
                           postprocess_fn=references_postprocessor,
                           preprocessors=tok)


@gin.configurable(module="phatgoose_jax.data.bigbench_tasks")
def register_bigbench_tasks(vocabulary=gin.REQUIRED, source: str = "jsonl",
                            data_dir: Optional[str] = None,
                            suites=("bbh", "bbl"),
                            hf_kwargs: Optional[Mapping[str, Any]] = None) -> list[str]:
  """Registers `bbh_*` (22) and/or `bbl_*` (17) Tasks plus a mixture per suite.

  Returns:
    Task names per suite in catalog order, each suite followed by its mixture.
  """
  if vocabulary is gin.REQUIRED or vocabulary is None:
    raise BigBenchDataError("register_bigbench_tasks: vocabulary is not set")
  names = []
  for suite in suites:
    if suite not in SUITES:
      raise BigBenchDataError(f"suites: unknown suite {suite!r}; expected {tuple(SUITES)}")
    tasks = [_register_one(suite, t, vocabulary, source, data_dir, hf_kwargs)
             for t in SUITES[suite]]
    names += tasks + [p3_tasks.add_mixture(suite, tasks)]
  return names


@gin.configurable(module="phatgoose_jax.data.bigbench_tasks")
def task_module(register=None) -> str:
  """Registers the BIG-bench tasks from gin; returns this module's name (see
  `p3_tasks.task_module`)."""
  (register or register_bigbench_tasks)()
  return __name__
