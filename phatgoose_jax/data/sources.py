"""seqio data sources: HF datasets, TFDS, and local JSONL / parquet / TFRecord.

Every source is a `seqio.DataSource` mapping split -> rows (dicts of string,
int, float, bool or list-of-string / list-of-int features), selectable in gin
through `make_source(kind, ...)`:

  kind        backend                                    needs
  "jsonl"     JsonlDataSource (one JSON object a line)   -
  "parquet"   ParquetDataSource (pyarrow)                pyarrow
  "tfrecord"  seqio.TFExampleDataSource (tf.train.Example)  -
  "tfds"      seqio.TfdsDataSource                       tensorflow-datasets
  "hf"        HuggingFaceDataSource (datasets.load_dataset, lazily)  datasets

Local files are for offline clusters: a split maps to a glob pattern or a list
of paths, read in sorted order (deterministic). Rows are read in python and fed
to tf.data through a generator whose signature is inferred from the first
row. seqio shards these sources with `Dataset.shard` after reading.

No tensors with named axes here, so no einsum letters are used.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

import gin
import seqio
import tensorflow as tf

SplitPatterns = Mapping[str, Union[str, Sequence[str]]]


class DataSourceError(ValueError):
  """A data source is misconfigured or its files cannot be read."""


class MissingDependencyError(ImportError):
  """An optional package needed by a data source is not installed."""


def _expand(split: str, patterns: Union[str, Sequence[str]]) -> list[str]:
  if isinstance(patterns, (str, os.PathLike)):
    patterns = [patterns]
  files: list[str] = []
  for p in patterns:
    p = os.fspath(p)
    matched = sorted(glob.glob(p)) if glob.has_magic(p) else ([p] if os.path.exists(p) else [])
    if not matched:
      raise DataSourceError(f"split {split!r}: no file matches {p!r}")
    files.extend(matched)
  return files


def _feature_spec(name: str, value: Any, where: str) -> tf.TensorSpec:
  """TensorSpec for one python value (str/int/float/bool or a list of them)."""
  if isinstance(value, (list, tuple)):
    if not value:
      raise DataSourceError(
          f"{where}: field {name!r} is an empty list in the first row; cannot "
          "infer its type (pass `features=`)")
    inner = _feature_spec(name, value[0], where)
    if inner.shape.rank != 0:
      raise DataSourceError(f"{where}: field {name!r} is a nested list")
    return tf.TensorSpec([None], inner.dtype)
  if isinstance(value, (str, bytes)):
    return tf.TensorSpec([], tf.string)
  if isinstance(value, bool):
    return tf.TensorSpec([], tf.bool)
  if isinstance(value, int):
    return tf.TensorSpec([], tf.int64)
  if isinstance(value, float):
    return tf.TensorSpec([], tf.float32)
  raise DataSourceError(
      f"{where}: field {name!r} has unsupported type {type(value).__name__}")


_KIND_TO_SPEC = {
    "string": tf.TensorSpec([], tf.string),
    "int": tf.TensorSpec([], tf.int64),
    "float": tf.TensorSpec([], tf.float32),
    "bool": tf.TensorSpec([], tf.bool),
    "string_list": tf.TensorSpec([None], tf.string),
    "int_list": tf.TensorSpec([None], tf.int64),
    "float_list": tf.TensorSpec([None], tf.float32),
}


def _spec_from_kinds(features: Mapping[str, str], where: str) -> dict[str, tf.TensorSpec]:
  out = {}
  for k, kind in features.items():
    if kind not in _KIND_TO_SPEC:
      raise DataSourceError(
          f"{where}: feature {k!r} has kind {kind!r}; expected one of "
          f"{sorted(_KIND_TO_SPEC)}")
    out[k] = _KIND_TO_SPEC[kind]
  return out


class PythonRowsDataSource(seqio.FunctionDataSource):
  """A seqio source over rows produced by a python function per split.

  Args:
    read_rows: `read_rows(split) -> iterator of dicts`.
    splits: the split names.
    features: optional {name: kind} (kinds: string, int, float, bool,
      string_list, int_list, float_list); only these fields are kept. When None
      all fields of the first row are kept with inferred types.
    name: used in error messages.
  """

  def __init__(self, read_rows: Callable[[str], Iterable[Mapping[str, Any]]],
               splits: Sequence[str],
               features: Optional[Mapping[str, str]] = None,
               name: str = "rows",
               num_input_examples: Optional[Mapping[str, int]] = None):
    self._read_rows = read_rows
    self._features = dict(features) if features else None
    if self._features is not None:
      _spec_from_kinds(self._features, name)  # Fail early on unknown kinds.
    self._name = name
    super().__init__(dataset_fn=self._dataset_fn_impl, splits=list(splits),
                     num_input_examples=num_input_examples)

  def _signature(self, split: str, first: Mapping[str, Any]):
    where = f"{self._name} split {split!r}"
    if self._features is not None:
      return _spec_from_kinds(self._features, where)
    return {k: _feature_spec(k, v, where) for k, v in first.items()}

  def _dataset_fn_impl(self, split: str, shuffle_files: bool, seed=None):
    del shuffle_files, seed  # Files are read in sorted order; seqio shuffles.
    if split not in self.splits:
      raise DataSourceError(
          f"{self._name}: unknown split {split!r}; available {list(self.splits)}")
    first = next(iter(self._read_rows(split)), None)
    if first is None:
      raise DataSourceError(f"{self._name} split {split!r} has no rows")
    signature = self._signature(split, first)
    read_rows, name = self._read_rows, self._name

    def gen() -> Iterator[dict[str, Any]]:
      for i, row in enumerate(read_rows(split)):
        missing = [k for k in signature if k not in row]
        if missing:
          raise DataSourceError(
              f"{name} split {split!r} row {i}: missing field(s) {missing}")
        yield {k: row[k] for k in signature}
    return tf.data.Dataset.from_generator(gen, output_signature=signature)


def read_jsonl_rows(files: Sequence[str]) -> Iterator[dict[str, Any]]:
  for path in files:
    with open(path, "r", encoding="utf-8") as f:
      for n, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          row = json.loads(line)
        except json.JSONDecodeError as e:
          raise DataSourceError(f"{path}:{n}: invalid JSON ({e})") from e
        if not isinstance(row, dict):
          raise DataSourceError(f"{path}:{n}: expected a JSON object per line")
        yield row


def read_parquet_rows(files: Sequence[str]) -> Iterator[dict[str, Any]]:
  try:
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise MissingDependencyError(
        "parquet sources need pyarrow: pip install pyarrow") from e
  for path in files:
    try:
      pf = pq.ParquetFile(path)
    except Exception as e:
      raise DataSourceError(f"{path}: not a parquet file ({e})") from e
    for batch in pf.iter_batches():
      yield from batch.to_pylist()


@gin.configurable(module="phatgoose_jax.data")
class JsonlDataSource(PythonRowsDataSource):
  """JSON-lines files, one object a line; split -> glob pattern(s)."""

  def __init__(self, split_to_filepattern: SplitPatterns,
               features: Optional[Mapping[str, str]] = None):
    self.split_to_filepattern = dict(split_to_filepattern)
    super().__init__(
        lambda s: read_jsonl_rows(_expand(s, self.split_to_filepattern[s])),
        splits=list(self.split_to_filepattern), features=features, name="jsonl")


@gin.configurable(module="phatgoose_jax.data")
class ParquetDataSource(PythonRowsDataSource):
  """Parquet files (e.g. an offline copy of a HF dataset); split -> pattern(s)."""

  def __init__(self, split_to_filepattern: SplitPatterns,
               features: Optional[Mapping[str, str]] = None):
    self.split_to_filepattern = dict(split_to_filepattern)
    super().__init__(
        lambda s: read_parquet_rows(_expand(s, self.split_to_filepattern[s])),
        splits=list(self.split_to_filepattern), features=features,
        name="parquet")


@gin.configurable(module="phatgoose_jax.data")
class HuggingFaceDataSource(PythonRowsDataSource):
  """`datasets.load_dataset(path, name, ...)`; imported only when read.

  Args:
    path: HF dataset path (a hub name, or a local dir / script; on offline
      clusters point `data_files` / `cache_dir` at a local copy).
    name: dataset config name.
    splits: our split -> HF split expression (e.g. {"validation":
      "validation[:500]"}); a list means identical names.
    features: optional {name: kind}, see `PythonRowsDataSource`.
    **load_kwargs: passed to `datasets.load_dataset`.
  """

  def __init__(self, path: str, name: Optional[str] = None,
               splits: Union[Sequence[str], Mapping[str, str]] = ("train", "validation"),
               features: Optional[Mapping[str, str]] = None, **load_kwargs):
    self.path, self.config_name, self.load_kwargs = path, name, load_kwargs
    self.split_map = dict(splits) if isinstance(splits, Mapping) else {s: s for s in splits}
    super().__init__(self._read, splits=list(self.split_map), features=features,
                     name=f"hf:{path}" + (f"/{name}" if name else ""))

  def _read(self, split: str) -> Iterator[dict[str, Any]]:
    try:
      import datasets  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise MissingDependencyError(
          f"HuggingFaceDataSource({self.path!r}) needs the optional package "
          "'datasets' (pip install datasets), or use kind='jsonl'/'parquet' on "
          "a local copy") from e
    ds = datasets.load_dataset(self.path, self.config_name,
                               split=self.split_map[split], **self.load_kwargs)
    yield from ds


def tfrecord_source(split_to_filepattern: SplitPatterns,
                    features: Mapping[str, str]) -> seqio.TFExampleDataSource:
  """TFRecord files of `tf.train.Example`, parsed with simple feature kinds.

  Args:
    split_to_filepattern: split -> glob pattern(s).
    features: {name: kind}; scalar kinds (string/int/float) are required
      `FixedLenFeature`s, list kinds (string_list/int_list/float_list) are
      variable-length dense `[None]` tensors.
  """
  dtypes = {"string": tf.string, "int": tf.int64, "float": tf.float32}
  desc = {}
  for k, kind in features.items():
    base = kind[:-5] if kind.endswith("_list") else kind
    if base not in dtypes:
      raise DataSourceError(
          f"tfrecord: feature {k!r} has kind {kind!r}; expected string, int, "
          "float or *_list")
    if kind.endswith("_list"):
      desc[k] = tf.io.FixedLenSequenceFeature([], dtypes[base], allow_missing=True)
    else:
      desc[k] = tf.io.FixedLenFeature([], dtypes[base])
  for split, pats in split_to_filepattern.items():
    _expand(split, pats)  # Fail early, naming the missing file.
  return seqio.TFExampleDataSource(dict(split_to_filepattern), desc)


def tfds_source(tfds_name: str, splits: Optional[Union[Sequence[str], Mapping[str, str]]] = None,
                tfds_data_dir: Optional[str] = None) -> seqio.TfdsDataSource:
  """`seqio.TfdsDataSource` ("name/config:version"), optionally split-mapped."""
  return seqio.TfdsDataSource(tfds_name=tfds_name, splits=splits,
                              tfds_data_dir=tfds_data_dir)


_KINDS: dict[str, Callable[..., seqio.DataSource]] = {
    "jsonl": JsonlDataSource,
    "parquet": ParquetDataSource,
    "tfrecord": tfrecord_source,
    "tfds": tfds_source,
    "hf": HuggingFaceDataSource,
}


@gin.configurable(module="phatgoose_jax.data")
def make_source(kind: str, **kwargs) -> seqio.DataSource:
  """Builds a data source by kind: jsonl, parquet, tfrecord, tfds or hf."""
  if kind not in _KINDS:
    raise DataSourceError(
        f"make_source: unknown kind {kind!r}; expected one of {sorted(_KINDS)}")
  return _KINDS[kind](**kwargs)
