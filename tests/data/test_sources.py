"""Tests for phatgoose_jax.data.sources: local files read back through seqio."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import seqio
import tensorflow as tf

from phatgoose_jax.data import preprocessors as prep
from phatgoose_jax.data import sources

ROWS = [
    {"question": "red or blue", "answer": "blue", "choices": ["red", "blue"], "label": 1},
    {"question": "cat then dog", "answer": "dog", "choices": ["cat", "dog", "cow"], "label": 1},
    {"question": "one two", "answer": "two", "choices": ["two", "one"], "label": 0},
]


def _normalize(ex):
  out = {}
  for k, v in ex.items():
    if isinstance(v, bytes):
      v = v.decode()
    elif isinstance(v, np.ndarray):
      v = [x.decode() if isinstance(x, bytes) else int(x) for x in v.tolist()]
    elif isinstance(v, np.integer):
      v = int(v)
    out[k] = v
  return out


def _read(source, split="train"):
  ds = source.get_dataset(split=split, shuffle=False)
  return [_normalize(ex) for ex in ds.as_numpy_iterator()]


def _write_jsonl(path, rows):
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def _write_tfrecord(path, rows):
  with tf.io.TFRecordWriter(str(path)) as w:
    for r in rows:
      feats = {
          "question": tf.train.Feature(bytes_list=tf.train.BytesList(value=[r["question"].encode()])),
          "answer": tf.train.Feature(bytes_list=tf.train.BytesList(value=[r["answer"].encode()])),
          "choices": tf.train.Feature(bytes_list=tf.train.BytesList(
              value=[c.encode() for c in r["choices"]])),
          "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[r["label"]])),
      }
      w.write(tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString())


def test_jsonl_reads_rows_across_files(tmp_path):
  _write_jsonl(tmp_path / "train-00000.jsonl", ROWS[:2])
  _write_jsonl(tmp_path / "train-00001.jsonl", ROWS[2:])
  _write_jsonl(tmp_path / "val.jsonl", ROWS[:1])
  src = sources.make_source("jsonl", split_to_filepattern={
      "train": str(tmp_path / "train-*.jsonl"), "validation": str(tmp_path / "val.jsonl")})
  assert isinstance(src, seqio.DataSource)
  assert _read(src) == ROWS
  assert _read(src, "validation") == ROWS[:1]


def test_jsonl_feature_subset_and_types(tmp_path):
  _write_jsonl(tmp_path / "a.jsonl", ROWS)
  src = sources.make_source("jsonl", split_to_filepattern={"train": str(tmp_path / "a.jsonl")},
                            features={"question": "string", "label": "int"})
  spec = src.get_dataset("train", shuffle=False).element_spec
  assert set(spec) == {"question", "label"}
  assert spec["label"].dtype == tf.int64
  assert _read(src) == [{"question": r["question"], "label": r["label"]} for r in ROWS]


def test_parquet_reads_rows(tmp_path):
  pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "train.parquet")
  src = sources.make_source("parquet", split_to_filepattern={"train": str(tmp_path / "*.parquet")})
  assert _read(src) == ROWS


def test_tfrecord_reads_rows(tmp_path):
  _write_tfrecord(tmp_path / "train.tfrecord", ROWS)
  src = sources.make_source(
      "tfrecord", split_to_filepattern={"train": str(tmp_path / "train.tfrecord")},
      features={"question": "string", "answer": "string", "choices": "string_list",
                "label": "int"})
  assert _read(src) == ROWS


def test_jsonl_through_a_seqio_task(tmp_path, vocabulary):
  _write_jsonl(tmp_path / "train.jsonl", ROWS)
  name = "test_sources_jsonl_task"
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  task = seqio.TaskRegistry.add(
      name,
      source=sources.make_source("jsonl", split_to_filepattern={"train": str(tmp_path / "train.jsonl")}),
      preprocessors=[
          lambda ds: prep.rename_fields(ds, {"inputs": "question", "targets": "answer"}),
          seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
      output_features={"inputs": seqio.Feature(vocabulary), "targets": seqio.Feature(vocabulary)})
  try:
    got = list(task.get_dataset({"inputs": 16, "targets": 4}, split="train", shuffle=False)
               .as_numpy_iterator())
    assert [vocabulary.decode(ex["inputs"].tolist()) for ex in got] == [r["question"] for r in ROWS]
    assert all(ex["targets"][-1] == 1 for ex in got)
  finally:
    seqio.TaskRegistry.remove(name)


def test_bad_configuration_errors_name_the_problem(tmp_path):
  with pytest.raises(sources.DataSourceError, match="missing.jsonl"):
    _read(sources.make_source("jsonl", split_to_filepattern={"train": str(tmp_path / "missing.jsonl")}))
  with pytest.raises(sources.DataSourceError, match="nothing-\\*.tfrecord"):
    sources.make_source("tfrecord", split_to_filepattern={"train": str(tmp_path / "nothing-*.tfrecord")},
                        features={"q": "string"})
  with pytest.raises(sources.DataSourceError, match="'csv'"):
    sources.make_source("csv", split_to_filepattern={})
  _write_jsonl(tmp_path / "a.jsonl", ROWS)
  with pytest.raises(sources.DataSourceError, match="'question'.*'text'"):
    sources.make_source("jsonl", split_to_filepattern={"train": str(tmp_path / "a.jsonl")},
                        features={"question": "text"})
  (tmp_path / "broken.jsonl").write_text('{"a": 1}\n{oops\n')
  src = sources.make_source("jsonl", split_to_filepattern={"train": str(tmp_path / "broken.jsonl")})
  with pytest.raises(Exception, match="broken.jsonl:2"):
    _read(src)


def test_hf_source_is_lazy_and_explains_missing_package():
  src = sources.make_source("hf", path="super_glue", name="rte", splits=["validation"])
  assert list(src.splits) == ["validation"]  # Construction imports nothing.
  try:
    import datasets  # noqa: F401
  except ImportError:
    with pytest.raises(sources.MissingDependencyError, match="datasets"):
      next(src._read("validation"))
  else:
    pytest.skip("datasets is installed; the no-network load is not exercised")


def test_p3_rows_with_wrongly_typed_fields_are_refused():
  """A hand-made export with is_correct "false" (bool("false") is True) or a null input is a
  named error, not a silently wrong row."""
  from phatgoose_jax.data import p3_tasks  # pylint: disable=g-import-not-at-top
  good = {"inputs_pretokenized": "a", "targets_pretokenized": "b", "idx": [0, 0],
          "is_correct": True}
  assert p3_tasks._normalize_row(good, True, "w")["is_correct"] is True  # pylint: disable=protected-access
  for bad, field in ((dict(good, is_correct="false"), "is_correct"),
                     (dict(good, inputs_pretokenized=None), "inputs_pretokenized")):
    with pytest.raises(p3_tasks.P3DataError, match=field):
      p3_tasks._normalize_row(bad, True, "w")  # pylint: disable=protected-access
