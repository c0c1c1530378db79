"""Batches in t5x's encoder-decoder layout, from seqio or from python lists.

Model features (all int32, t5x's `EncDecFeatureConverter(pack=False)` layout):
  encoder_input_tokens   [B, L]  input ids, EOS-terminated, 0-padded
  decoder_target_tokens  [B, T]  target ids, EOS-terminated, 0-padded
  decoder_input_tokens   [B, T]  targets shifted right by one, starting with 0
  decoder_loss_weights   [B, T]  1 where decoder_target_tokens > 0
(B batch, L encoder length, T decoder length.)

Two paths:
* `get_dataset`: a seqio Task/Mixture through a feature converter, batched,
  per-host sharded with `seqio.ShardInfo(shard_id, num_shards)`, returned as a
  `DataIterator` of numpy batches.
* `encode_examples` / `iterate_numpy_batches`: lists of dicts -> padded numpy
  batches with a python tokenizer, no tf.data (rank-classification scoring and
  the demo).

Resuming: the iterator is deterministic given (task, split, lengths, batch
size, seed, shard), so `DataIterator.state()` records how many batches were
consumed and `restore(state)` rebuilds the pipeline and `skip`s that many
batches inside tf.data. This gives bit-identical batches after restore at the
cost of re-reading the skipped data (cheap next to a training step; no
tf.data iterator checkpoint files to manage).
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import gin
import numpy as np

from phatgoose_jax.data import preprocessors as prep

MODEL_FEATURES = ("encoder_input_tokens", "decoder_target_tokens",
                  "decoder_input_tokens", "decoder_loss_weights")


class PipelineError(ValueError):
  """Bad pipeline arguments or a restore state that does not match."""


def _check_lengths(task_feature_lengths: Mapping[str, int]) -> None:
  for k in ("inputs", "targets"):
    if k not in task_feature_lengths:
      raise PipelineError(f"task_feature_lengths needs key {k!r}, got "
                          f"{dict(task_feature_lengths)}")
    if int(task_feature_lengths[k]) < 1:
      raise PipelineError(f"task_feature_lengths[{k!r}] must be >= 1, got "
                          f"{task_feature_lengths[k]}")


def _check_shard(shard_id: int, num_shards: int) -> None:
  if num_shards < 1 or not 0 <= shard_id < num_shards:
    raise PipelineError(
        f"shard_id={shard_id} must be in [0, num_shards={num_shards})")


class DataIterator:
  """Deterministic numpy batch iterator with a skip-based resume state."""

  def __init__(self, make_dataset: Callable[[], Any], fingerprint: Mapping[str, Any]):
    self._make_dataset = make_dataset
    self.fingerprint = dict(fingerprint)
    self._consumed = 0
    self._it: Optional[Iterator[Mapping[str, np.ndarray]]] = None

  def _start(self) -> None:
    ds = self._make_dataset()
    if self._consumed:
      ds = ds.skip(self._consumed)
    self._it = ds.as_numpy_iterator()

  def __iter__(self) -> "DataIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._it is None:
      self._start()
    batch = next(self._it)  # StopIteration ends a finite dataset.
    self._consumed += 1
    return dict(batch)

  @property
  def batches_consumed(self) -> int:
    return self._consumed

  def state(self) -> dict[str, Any]:
    """JSON-serializable position: batches consumed + the pipeline's identity."""
    return {"batches_consumed": self._consumed, "fingerprint": dict(self.fingerprint)}

  def restore(self, state: Mapping[str, Any]) -> None:
    """Continues right after the batch at which `state` was taken.

    Raises:
      PipelineError: when `state` came from a different pipeline (naming the
        first differing field).
    """
    fp = dict(state.get("fingerprint", {}))
    for k in sorted(set(fp) | set(self.fingerprint)):
      if fp.get(k) != self.fingerprint.get(k):
        raise PipelineError(
            f"data state mismatch in {k!r}: checkpoint has {fp.get(k)!r}, this "
            f"pipeline has {self.fingerprint.get(k)!r}")
    n = int(state.get("batches_consumed", -1))
    if n < 0:
      raise PipelineError(f"data state has invalid batches_consumed {n}")
    if n and self.fingerprint.get("shuffle") and self.fingerprint.get("seed") is None:
      raise PipelineError("cannot resume a shuffled pipeline with seed=None: its order is not "
                          "reproducible, so skipping the consumed batches would repeat and "
                          "skip rows; give the data a seed")
    self._consumed = n
    self._it = None


@gin.configurable(module="phatgoose_jax.data")
def get_dataset(mixture_or_task_name: str,
                task_feature_lengths: Mapping[str, int],
                split: str = "train",
                batch_size: int = 8,
                shuffle: bool = True,
                seed: Optional[int] = 0,
                num_epochs: Optional[int] = None,
                shard_id: int = 0,
                num_shards: int = 1,
                feature_converter=None,
                drop_remainder: bool = True) -> DataIterator:
  """Numpy batches of a seqio Task/Mixture in t5x's encoder-decoder layout.

  Args:
    mixture_or_task_name: registered seqio name (see `registry`).
    task_feature_lengths: {"inputs": L, "targets": T}; longer features keep
      their first L-1 tokens and EOS (with `append_eos_after_trim` in the Task).
    split: dataset split.
    batch_size: per-host batch size B.
    shuffle: shuffle (deterministically, given `seed`).
    seed: tf.data / mixture sampling seed.
    num_epochs: passes over the data; None repeats forever.
    shard_id, num_shards: this host's shard (`seqio.ShardInfo`).
    feature_converter: default `seqio.EncDecFeatureConverter(pack=False)`.
    drop_remainder: drop a final partial batch.

  Returns:
    A `DataIterator` of dicts with the MODEL_FEATURES arrays ([B, L] / [B, T]).
  """
  import seqio  # pylint: disable=g-import-not-at-top
  from phatgoose_jax.data import registry  # pylint: disable=g-import-not-at-top
  _check_lengths(task_feature_lengths)
  _check_shard(shard_id, num_shards)
  if batch_size < 1:
    raise PipelineError(f"batch_size must be >= 1, got {batch_size}")
  provider = registry.get_task_or_mixture(mixture_or_task_name)
  if split not in provider.splits:
    raise PipelineError(f"{mixture_or_task_name!r} has no split {split!r}; "
                        f"available {list(provider.splits)}")
  converter = feature_converter or seqio.EncDecFeatureConverter(pack=False)
  lengths = {k: int(v) for k, v in task_feature_lengths.items()}

  def make():
    # seqio.get_dataset's steps, with examples whose inputs or targets hold no token besides EOS
    # dropped before feature conversion (counted by `data_statistics`).
    ds = provider.get_dataset(
        sequence_length=lengths, split=split, use_cached=False, shuffle=shuffle,
        num_epochs=num_epochs, shard_info=seqio.ShardInfo(index=shard_id, num_shards=num_shards),
        seed=seed)
    ds = ds.filter(_tf_non_empty)
    if "is_correct" in ds.element_spec:  # rank-classification rows: teacher-force the answers
      ds = ds.filter(lambda ex: ex["is_correct"])
    ds = converter(ds, lengths)
    return ds.batch(batch_size, drop_remainder=drop_remainder)

  fingerprint = dict(name=mixture_or_task_name, split=split, lengths=lengths,
                     batch_size=batch_size, shuffle=shuffle, seed=seed,
                     num_epochs=num_epochs, shard_id=shard_id,
                     num_shards=num_shards, drop_remainder=drop_remainder,
                     converter=type(converter).__name__)
  return DataIterator(make, fingerprint)


def _tf_non_empty(ex):
  """True when both ``inputs`` and ``targets`` hold a real token (ids >= 2: not pad, not EOS)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.logical_and(tf.reduce_any(ex["inputs"] > 1), tf.reduce_any(ex["targets"] > 1))


def data_statistics(mixture_or_task_name: str, task_feature_lengths: Mapping[str, int],
                    split: str = "validation",
                    max_examples: Optional[int] = None) -> dict[str, int]:
  """Counts what `get_dataset` truncates and drops, over (up to ``max_examples``) examples.

  Truncation keeps the first L-1 tokens and EOS; an example whose inputs or targets have no token
  besides EOS is dropped (never truncated). Counts are of tokenized examples with EOS.

  Returns:
    {"num_examples": n, "inputs_truncated": ..., "targets_truncated": ..., "dropped_empty": ...}.
  """
  from phatgoose_jax.data import registry  # pylint: disable=g-import-not-at-top
  _check_lengths(task_feature_lengths)
  provider = registry.get_task_or_mixture(mixture_or_task_name)
  ds = provider.get_dataset(None, split=split, shuffle=False, num_epochs=1)
  if max_examples is not None:
    ds = ds.take(max_examples)
  counts = {"num_examples": 0, "inputs_truncated": 0, "targets_truncated": 0,
            "dropped_empty": 0}
  for ex in ds.as_numpy_iterator():
    counts["num_examples"] += 1
    if not all(k in ex and (np.asarray(ex[k]) > 1).any() for k in ("inputs", "targets")):
      counts["dropped_empty"] += 1
      continue
    for k in ("inputs", "targets"):
      if len(ex[k]) > task_feature_lengths[k]:
        counts[f"{k}_truncated"] += 1
  return counts


def count_truncated(mixture_or_task_name: str, task_feature_lengths: Mapping[str, int],
                    split: str = "validation",
                    max_examples: Optional[int] = None) -> dict[str, int]:
  """`data_statistics` without the empty count (examples, inputs/targets truncated)."""
  counts = data_statistics(mixture_or_task_name, task_feature_lengths, split, max_examples)
  counts.pop("dropped_empty")
  return counts


# ----------------------------------------------------------------------------
# numpy path (no tf.data)
# ----------------------------------------------------------------------------
@dataclasses.dataclass
class EncodeStats:
  num_examples: int = 0
  inputs_truncated: int = 0
  targets_truncated: int = 0
  dropped_empty: int = 0


def _encode_text(vocabulary, text) -> list[int]:
  if isinstance(text, bytes):
    text = text.decode("utf-8")
  return [int(t) for t in vocabulary.encode(text)]


def encode_examples(examples: Sequence[Mapping[str, Any]], vocabulary,
                    task_feature_lengths: Mapping[str, int],
                    passthrough: Sequence[str] = (),
                    stats: Optional[EncodeStats] = None) -> dict[str, np.ndarray]:
  """Tokenizes and pads examples into one batch of MODEL_FEATURES.

  Args:
    examples: dicts with string `inputs` and `targets` (or pre-tokenized lists
      of ids).
    vocabulary: anything with `encode(str) -> ids` (seqio vocabulary or
      `sentencepiece.SentencePieceProcessor`); eos_id 1 and pad 0 as in T5.
    task_feature_lengths: {"inputs": L, "targets": T}.
    passthrough: extra fields copied as stacked numpy arrays (e.g. "idx",
      "is_correct").
    stats: updated in place with truncation counts.

  Returns:
    {encoder_input_tokens [B, L], decoder_target_tokens [B, T],
     decoder_input_tokens [B, T], decoder_loss_weights [B, T]} int32, plus
    `passthrough` fields.
  """
  _check_lengths(task_feature_lengths)
  eos = getattr(vocabulary, "eos_id", 1)  # a property (seqio) or a method (sentencepiece)
  eos = int(eos() if callable(eos) else eos)
  L, T = int(task_feature_lengths["inputs"]), int(task_feature_lengths["targets"])
  B = len(examples)
  enc = np.zeros([B, L], np.int32)  # [batch, length]
  tgt = np.zeros([B, T], np.int32)  # [batch, tokens]
  for b, ex in enumerate(examples):
    for key, arr, n in (("inputs", enc, L), ("targets", tgt, T)):
      if key not in ex:
        raise PipelineError(f"example {b} has no field {key!r} (has {sorted(ex)})")
      v = ex[key]
      ids = _encode_text(vocabulary, v) if isinstance(v, (str, bytes)) else list(v)
      ids, cut = prep.truncate_keep_eos(ids, n, eos)
      arr[b, :len(ids)] = ids
      if stats is not None and cut:
        setattr(stats, f"{key}_truncated", getattr(stats, f"{key}_truncated") + 1)
  if stats is not None:
    stats.num_examples += B
  dec_in = np.zeros_like(tgt)  # [batch, tokens], BOS = 0
  dec_in[:, 1:] = tgt[:, :-1]
  batch = {"encoder_input_tokens": enc, "decoder_target_tokens": tgt,
           "decoder_input_tokens": dec_in,
           "decoder_loss_weights": (tgt > 0).astype(np.int32)}
  for k in passthrough:
    try:
      batch[k] = np.stack([np.asarray(ex[k]) for ex in examples])
    except KeyError as e:
      raise PipelineError(f"passthrough field {k!r} missing from an example") from e
  return batch


def iterate_numpy_batches(examples: Sequence[Mapping[str, Any]], vocabulary,
                          task_feature_lengths: Mapping[str, int],
                          batch_size: int,
                          shuffle: bool = False, seed: int = 0,
                          num_epochs: Optional[int] = 1,
                          shard_id: int = 0, num_shards: int = 1,
                          drop_remainder: bool = False,
                          drop_empty: bool = True,
                          passthrough: Sequence[str] = (),
                          start_batch: int = 0,
                          stats: Optional[EncodeStats] = None,
                          ) -> Iterator[dict[str, np.ndarray]]:
  """Yields padded numpy batches from in-memory examples, deterministically.

  Shard `s` of `n` takes examples s, s+n, s+2n, ... (before shuffling). Each
  epoch is shuffled with `random.Random(f"{seed}/{epoch}")`. `start_batch` skips
  that many batches (resume). The last partial batch is kept unless
  `drop_remainder`.
  """
  _check_shard(shard_id, num_shards)
  if batch_size < 1:
    raise PipelineError(f"batch_size must be >= 1, got {batch_size}")
  rows = list(examples)[shard_id::num_shards]
  if drop_empty:
    kept = [r for r in rows if not prep.is_empty_example(r)]
    if stats is not None:
      stats.dropped_empty += len(rows) - len(kept)
    rows = kept
  if not rows:
    return
  epoch, produced = 0, 0
  while num_epochs is None or epoch < num_epochs:
    order = list(range(len(rows)))
    if shuffle:
      random.Random(f"{seed}/{epoch}").shuffle(order)
    for start in range(0, len(order), batch_size):
      idx = order[start:start + batch_size]
      if drop_remainder and len(idx) < batch_size:
        break
      produced += 1
      if produced <= start_batch:
        continue
      yield encode_examples([rows[i] for i in idx], vocabulary,
                            task_feature_lengths, passthrough, stats)
    epoch += 1
