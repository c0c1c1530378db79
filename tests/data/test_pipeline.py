"""Tests for pipeline batches, rank-classification expansion and the registry."""

import numpy as np
import pytest
import tensorflow as tf

from phatgoose_jax.data import pipeline
from phatgoose_jax.data import preprocessors as prep
from phatgoose_jax.data import registry
from phatgoose_jax.data import synthetic

LENGTHS = {"inputs": 24, "targets": 16}


def _check_layout(batch, batch_size):
  assert set(batch) == set(pipeline.MODEL_FEATURES)
  for k, v in batch.items():
    assert v.dtype == np.int32, k
  assert batch["encoder_input_tokens"].shape == (batch_size, LENGTHS["inputs"])
  tgt = batch["decoder_target_tokens"]
  assert tgt.shape == (batch_size, LENGTHS["targets"])
  np.testing.assert_array_equal(batch["decoder_loss_weights"], (tgt > 0).astype(np.int32))
  np.testing.assert_array_equal(batch["decoder_input_tokens"][:, 0], 0)
  np.testing.assert_array_equal(batch["decoder_input_tokens"][:, 1:], tgt[:, :-1])
  for key in ("encoder_input_tokens", "decoder_target_tokens"):
    for row in batch[key]:
      n = int((row > 0).sum())
      assert n >= 2 and row[n - 1] == 1 and not row[n:].any()  # EOS, then pad.


def test_seqio_batches_layout(synthetic_tasks):
  it = pipeline.get_dataset("synthetic_multitask", LENGTHS, batch_size=4, seed=1)
  for _ in range(2):
    _check_layout(next(it), 4)


def test_seqio_and_numpy_paths_agree(vocabulary, synthetic_tasks):
  it = pipeline.get_dataset("synthetic_compose2_gen", LENGTHS, split="test", batch_size=4,
                            shuffle=False, num_epochs=1)
  seqio_batch = next(it)
  examples = synthetic.generate_examples("compose2_gen", "test", 4, seed=0)
  np_batch = pipeline.encode_examples(examples, vocabulary, LENGTHS)
  _check_layout(np_batch, 4)
  for k in pipeline.MODEL_FEATURES:
    np.testing.assert_array_equal(seqio_batch[k], np_batch[k], err_msg=k)


def test_deterministic_and_bit_identical_resume(synthetic_tasks):
  make = lambda seed: pipeline.get_dataset("synthetic_multitask", LENGTHS, batch_size=3, seed=seed)
  a, b, other = make(7), make(7), make(8)
  first_a = [next(a) for _ in range(4)]
  first_b = [next(b) for _ in range(4)]
  first_o = [next(other) for _ in range(4)]
  for x, y in zip(first_a, first_b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert any((x["encoder_input_tokens"] != y["encoder_input_tokens"]).any()
             for x, y in zip(first_a, first_o))
  state = a.state()
  assert state["batches_consumed"] == 4
  want = [next(a) for _ in range(2)]
  resumed = make(7)
  resumed.restore(state)
  got = [next(resumed) for _ in range(2)]
  for x, y in zip(want, got):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  with pytest.raises(pipeline.PipelineError, match="'seed'"):
    make(8).restore(state)
  unseeded = make(None)
  with pytest.raises(pipeline.PipelineError, match="seed=None"):
    unseeded.restore(dict(unseeded.state(), batches_consumed=4))
  unseeded.restore(unseeded.state())  # nothing consumed yet: nothing to reproduce


def _rows(it):
  return [tuple(r) for b in it for r in b["encoder_input_tokens"]]


def test_shards_are_disjoint_and_cover(synthetic_tasks):
  def rows(shard_id, num_shards):
    return _rows(pipeline.get_dataset(
        "synthetic_reverse_colours", LENGTHS, split="validation", batch_size=1, shuffle=False,
        num_epochs=1, shard_id=shard_id, num_shards=num_shards))
  full = rows(0, 1)
  s0, s1 = rows(0, 2), rows(1, 2)
  assert len(full) == 16 and len(set(full)) == 16
  assert s0 and s1 and not set(s0) & set(s1)
  assert sorted(s0 + s1) == sorted(full)
  with pytest.raises(pipeline.PipelineError, match="shard_id=2"):
    pipeline.get_dataset("synthetic_reverse_colours", LENGTHS, shard_id=2, num_shards=2)


def test_numpy_batches_shard_resume_and_empty(vocabulary):
  examples = synthetic.generate_examples("sort_digits", "train", 10, seed=0)
  examples.append({"inputs": "  ", "targets": "x"})
  stats = pipeline.EncodeStats()
  kw = dict(vocabulary=vocabulary, task_feature_lengths=LENGTHS, batch_size=2, shuffle=True,
            seed=3)
  s0 = _rows(pipeline.iterate_numpy_batches(examples, shard_id=0, num_shards=2, stats=stats, **kw))
  s1 = _rows(pipeline.iterate_numpy_batches(examples, shard_id=1, num_shards=2, **kw))
  # Shard 0 holds examples 0, 2, .., 10 (10 is the empty one), shard 1 holds 1, 3, .., 9.
  assert stats.dropped_empty == 1 and stats.num_examples == 5
  assert len(s0) == 5 and len(s1) == 5
  assert not set(s0) & set(s1) and len(set(s0) | set(s1)) == 10
  all_stats = pipeline.EncodeStats()
  batches = list(pipeline.iterate_numpy_batches(examples, stats=all_stats, num_epochs=2, **kw))
  assert all_stats.dropped_empty == 1 and len(batches) == 10
  resumed = list(pipeline.iterate_numpy_batches(examples, num_epochs=2, start_batch=6, **kw))
  assert len(resumed) == 4
  for x, y in zip(batches[6:], resumed):
    np.testing.assert_array_equal(x["encoder_input_tokens"], y["encoder_input_tokens"])
  assert (batches[0]["encoder_input_tokens"] != batches[5]["encoder_input_tokens"]).any()


def test_truncation_keeps_eos_and_is_counted(vocabulary, synthetic_tasks):
  ex = {"inputs": "double alpha beta gamma then next cat dog", "targets": "alpha alpha beta"}
  full = vocabulary.encode(ex["inputs"])
  stats = pipeline.EncodeStats()
  batch = pipeline.encode_examples([ex], vocabulary, {"inputs": 5, "targets": 16}, stats=stats)
  assert batch["encoder_input_tokens"][0].tolist() == full[:4] + [1]
  assert (stats.inputs_truncated, stats.targets_truncated, stats.num_examples) == (1, 0, 1)
  assert prep.truncate_keep_eos([5, 6], 3) == ([5, 6, 1], False)
  counts = pipeline.count_truncated("synthetic_double_letters", {"inputs": 6, "targets": 64},
                                    split="validation")
  rows = synthetic.generate_examples("double_letters", "validation", 16)
  want = sum(len(vocabulary.encode(r["inputs"])) + 1 > 6 for r in rows)
  assert counts == {"num_examples": 16, "inputs_truncated": want, "targets_truncated": 0}
  assert want > 0  # The length is small enough for truncation to happen.


TWO = [
    {"inputs": "pick a colour", "answer_choices": ["red", "blue", "green"], "label": 2},
    {"inputs": "pick an animal", "answer_choices": ["cat", "dog"], "label": 0},
]


def test_rank_classification_expansion_tf_and_python():
  ds = tf.data.Dataset.from_generator(
      lambda: iter(TWO), output_signature={
          "inputs": tf.TensorSpec([], tf.string),
          "answer_choices": tf.TensorSpec([None], tf.string),
          "label": tf.TensorSpec([], tf.int64)})
  rows = list(prep.rank_classification(ds).as_numpy_iterator())
  want = [("pick a colour", "red", [0, 0], False), ("pick a colour", "blue", [0, 1], False),
          ("pick a colour", "green", [0, 2], True), ("pick an animal", "cat", [1, 0], True),
          ("pick an animal", "dog", [1, 1], False)]
  got = [(r["inputs"].decode(), r["targets"].decode(), r["idx"].tolist(), bool(r["is_correct"]))
         for r in rows]
  assert got == want
  py = [(r["inputs"], r["targets"], r["idx"].tolist(), r["is_correct"])
        for r in prep.rank_classification_rows(TWO)]
  assert py == want
  train = list(prep.rank_classification(ds, mode="train").as_numpy_iterator())
  assert [r["targets"].decode() for r in train] == ["green", "cat"]
  with pytest.raises(prep.PreprocessorError, match="'label'"):
    prep.rank_classification(ds.map(lambda x: {"inputs": x["inputs"],
                                               "answer_choices": x["answer_choices"]}))
  with pytest.raises(prep.PreprocessorError, match="'label'=5"):
    prep.rank_classification_rows([dict(TWO[1], label=5)])
  # The tf.data path refuses them too (it scored the example wrong / dropped it silently).
  spec = {"inputs": tf.TensorSpec([], tf.string),
          "answer_choices": tf.TensorSpec([None], tf.string),
          "label": tf.TensorSpec([], tf.int64)}
  for bad, match in ((dict(TWO[1], label=5), "not an index"), (dict(TWO[1], label=-1), "negative"),
                     (dict(TWO[1], answer_choices=[]), "empty")):
    bad_ds = tf.data.Dataset.from_generator(lambda b=bad: iter([b]), output_signature=spec)
    with pytest.raises(tf.errors.InvalidArgumentError, match=match):
      list(prep.rank_classification(bad_ds).as_numpy_iterator())


def test_rank_metric_and_numpy_choice_batch(vocabulary):
  rows = prep.rank_classification_rows(TWO)
  targets = [prep.rank_classification_postprocessor(r["targets"], example=r, is_target=True)
             for r in rows]
  # Example 0 picks choice 2 (correct); example 1 picks choice 1 (wrong).
  assert prep.rank_classification_accuracy(targets, [-3.0, -2.0, -1.0, -5.0, -4.0]) == {
      "accuracy": 50.0}
  batch = pipeline.encode_examples(rows, vocabulary, LENGTHS, passthrough=("idx", "is_correct"))
  assert batch["idx"].shape == (5, 2) and batch["is_correct"].tolist() == [
      False, False, True, True, False]
  assert prep.exact_match_accuracy(["a b", "c"], [" a b", "d"]) == {"accuracy": 50.0}


def test_p3_rows_filter_empty_and_answer_text():
  ds = tf.data.Dataset.from_tensor_slices({
      "inputs_pretokenized": ["Q1 ", "", "Q3"], "targets_pretokenized": ["yes\n", "no", " "],
      "idx": [[0, 0], [0, 1], [1, 0]], "is_correct": [True, False, True],
      "inputs": [[1, 2], [3, 4], [5, 6]]})
  out = list(prep.filter_empty(prep.p3_rows_to_text(ds)).as_numpy_iterator())
  assert [(r["inputs"], r["targets"], r["idx"].tolist()) for r in out] == [(b"Q1 ", b"yes", [0, 0])]
  assert prep.answer_choices_instance_text("Is it?", ["yes", "no"]) == (
      "Answer Choices: yes, no, Instance: Is it?")


def test_registry_errors(synthetic_tasks):
  with pytest.raises(registry.UnknownTaskError, match="synthetic_reverse_colour.*synthetic_reverse_colours"):
    registry.get_task_or_mixture("synthetic_reverse_colour")
  assert registry.get_task_or_mixture("synthetic_multitask").name == "synthetic_multitask"
  with pytest.raises(registry.TaskModuleError, match="no_such_tasks_module"):
    registry.import_task_module("no_such_tasks_module")
  assert registry.import_task_module(["json", "phatgoose_jax.data.synthetic"]) == [
      "json", "phatgoose_jax.data.synthetic"]
  assert registry.import_task_module(None) == []


def test_empty_examples_are_dropped_and_counted(vocabulary):
  """get_dataset drops rows whose inputs or targets have no token; data_statistics counts them."""
  import seqio
  rows = [("reverse red blue", "blue red"), ("", "red"), ("next cat", ""),
          ("sort two one three five four", "one two three four five"), ("skip fig", "fig")]

  def source(split, shuffle_files, seed=None):
    del split, shuffle_files, seed
    return tf.data.Dataset.from_tensor_slices(
        {"inputs": [r[0] for r in rows], "targets": [r[1] for r in rows]})

  name = "pipeline_test_with_empty_rows"
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(
      name, source=seqio.FunctionDataSource(source, splits=["train"]),
      preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
      output_features={"inputs": seqio.Feature(vocabulary, add_eos=True),
                       "targets": seqio.Feature(vocabulary, add_eos=True)})
  lengths = {"inputs": 4, "targets": 16}
  batches = list(pipeline.get_dataset(name, lengths, "train", batch_size=1, shuffle=False,
                                      num_epochs=1))
  kept = [b["encoder_input_tokens"][0] for b in batches]
  assert len(kept) == 3
  want_inputs = [vocabulary.encode(r[0]) for r in rows if r[0] and r[1]]
  for got, full in zip(kept, want_inputs):
    expect = (full[:3] + [1]) if len(full) + 1 > 4 else full + [1]
    assert got[:len(expect)].tolist() == expect
  stats = pipeline.data_statistics(name, lengths, "train")
  truncated = sum(len(vocabulary.encode(r[0])) + 1 > 4 for r in rows if r[0] and r[1])
  assert stats == {"num_examples": 5, "inputs_truncated": truncated, "targets_truncated": 0,
                   "dropped_empty": 2}
  assert truncated > 0  # the lengths are small enough for truncation to happen


def test_encode_examples_accepts_a_raw_sentencepiece_processor(vocabulary):
  """eos_id is a property on seqio vocabularies and a method on SentencePieceProcessor."""
  import sentencepiece as spm
  sp = spm.SentencePieceProcessor(model_file=vocabulary.sentencepiece_model_file)
  ex = [{"inputs": "reverse red blue green", "targets": "green blue red"}]
  lengths = {"inputs": 12, "targets": 8}
  got = pipeline.encode_examples(ex, sp, lengths)
  want = pipeline.encode_examples(ex, vocabulary, lengths)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])
  assert 1 in got["encoder_input_tokens"][0].tolist()
