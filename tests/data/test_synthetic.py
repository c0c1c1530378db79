"""Tests for phatgoose_jax.data.synthetic (generation and seqio registration)."""

import numpy as np
import pytest
import seqio

from phatgoose_jax.data import preprocessors as prep
from phatgoose_jax.data import synthetic

ALL_TASKS = synthetic.SYNTHETIC_EXPERT_TASKS + synthetic.SYNTHETIC_HELDOUT_TASKS


# An independent re-implementation of the skills, written from the task
# descriptions (so a bug in synthetic.SKILLS shows up as a mismatch).
def _family_of(word):
  hits = [f for f, ws in synthetic.FAMILIES.items() if word in ws]
  assert len(hits) == 1, word
  return hits[0]


def _expected(skill, items):
  if skill == "reverse":
    return items[::-1]
  if skill == "next":
    out = []
    for w in items:
      fam = synthetic.FAMILIES[_family_of(w)]
      out.append(fam[(fam.index(w) + 1) % len(fam)])
    return out
  if skill == "sort":
    fam = synthetic.FAMILIES[_family_of(items[0])]
    return [w for w in fam if w in items]  # Items are distinct.
  if skill == "skip":
    return [w for i, w in enumerate(items) if i % 2 == 0]
  if skill == "rotate":
    return items[1:] + items[:1]
  if skill == "double":
    return [w for w in items for _ in (0, 1)]
  if skill == "copy":
    return items
  raise AssertionError(skill)


def _solve(inputs):
  """Parses 'skill w w then skill w ...' and applies the skills."""
  outs, segs = [], []
  for seg in inputs.split(" then "):
    skill, *items = seg.split()
    segs.append((skill, items))
    outs.append(" ".join(_expected(skill, items)))
  return " then ".join(outs), segs


def test_same_seed_same_rows_other_seed_other_rows():
  for name in ALL_TASKS:
    a = synthetic.generate_examples(name, "train", 20, seed=5)
    b = synthetic.generate_examples("synthetic_" + name, "train", 20, seed=5)
    c = synthetic.generate_examples(name, "train", 20, seed=6)
    assert a == b
    assert [r["inputs"] for r in a] != [r["inputs"] for r in c]


def test_splits_are_disjoint():
  for name in ("reverse_colours", "compose2_gen"):
    sets = {s: {r["inputs"] for r in synthetic.generate_examples(name, s, 60)}
            for s in synthetic.SPLITS}
    assert not sets["train"] & sets["validation"]
    assert not sets["train"] & sets["test"]
    assert not sets["validation"] & sets["test"]


def test_targets_are_correct_and_short():
  for name in ALL_TASKS:
    for r in synthetic.generate_examples(name, "validation", 40, seed=2):
      target, segs = _solve(r["inputs"])
      assert r["targets"] == target, (name, r["inputs"])
      assert len(r["inputs"].split()) <= 16 and len(r["targets"].split()) <= 12
      for skill, items in segs:
        assert len({_family_of(w) for w in items}) == 1  # One family a segment.


def test_each_expert_task_is_one_skill_on_one_family():
  pairs = set()
  for name in synthetic.SYNTHETIC_EXPERT_TASKS:
    seen = set()
    for r in synthetic.generate_examples(name, "train", 40, seed=0):
      for skill, items in _solve(r["inputs"])[1]:
        if skill != "copy":
          seen.add((skill, _family_of(items[0])))
    assert len(seen) == 1, (name, seen)
    pairs |= seen
  assert len(synthetic.SYNTHETIC_EXPERT_TASKS) >= 6
  assert len(pairs) == len(synthetic.SYNTHETIC_EXPERT_TASKS)
  assert len({f for _, f in pairs}) == len(pairs)  # Disjoint families.
  assert len({s for s, _ in pairs}) == len(pairs)  # Distinct skills.


def test_heldout_needs_different_experts_for_different_tokens():
  expert_pairs = {(e.skill, e.family): e.name for e in synthetic.EXPERTS.values()}
  for name in synthetic.SYNTHETIC_HELDOUT_TASKS:
    for r in synthetic.generate_examples(name, "test", 30, seed=3):
      parsed = _solve(r["inputs"])[1]
      assert len(parsed) >= 2
      needed = [expert_pairs.get((skill, _family_of(items[0]))) for skill, items in parsed]
      assert None not in needed, r["inputs"]  # Every segment is some expert's skill.
      assert len(set(needed)) == len(needed)  # ... and a different expert each.
      # Construction info agrees with the parsed text.
      assert [s["expert"] for s in r["segments"]] == needed


def test_choice_task_has_one_correct_and_one_wrong_segment_distractors():
  rows = synthetic.generate_examples("compose2_choice", "validation", 40, seed=0)
  labels = set()
  for r in rows:
    choices = r["answer_choices"]
    assert len(choices) == 4 and len(set(choices)) == 4
    assert [c for c in choices if c == r["targets"]] == [choices[r["label"]]]
    labels.add(r["label"])
    gold = r["targets"].split(" then ")
    for i, c in enumerate(choices):
      if i != r["label"]:
        diffs = sum(a != b for a, b in zip(c.split(" then "), gold))
        assert diffs == 1, (c, r["targets"])
  assert len(labels) > 1  # The correct choice is not always in one slot.


def test_corpus_covers_lexicon_without_task_solutions():
  lines = synthetic.synthetic_corpus(200, seed=0)
  assert lines == synthetic.synthetic_corpus(200, seed=0)
  words = {w for line in lines for w in line.split()}
  for fam in synthetic.FAMILIES.values():
    assert set(fam) <= words
  assert set(synthetic.SKILLS) <= words
  targets = {r["targets"] for r in synthetic.generate_examples("compose2_gen", "test", 50)}
  assert not targets & set(lines)


def test_bad_names_raise():
  with pytest.raises(synthetic.SyntheticTaskError, match="'nope'"):
    synthetic.generate_examples("nope")
  with pytest.raises(synthetic.SyntheticTaskError, match="'dev'"):
    synthetic.generate_examples("reverse_colours", "dev")


def test_registration_is_idempotent_and_yields_tokens(vocabulary, synthetic_tasks):
  again = synthetic.register_synthetic_tasks(vocabulary, num_examples={"train": 48, "validation": 16, "test": 16})
  assert again == synthetic_tasks
  assert "synthetic_multitask" in synthetic_tasks
  mix = seqio.get_mixture_or_task("synthetic_multitask")
  assert sorted(t.name for t in mix.tasks) == sorted(
      "synthetic_" + n for n in synthetic.SYNTHETIC_EXPERT_TASKS)
  task = seqio.get_mixture_or_task("synthetic_compose2_gen")
  rows = list(task.get_dataset({"inputs": 32, "targets": 24}, split="test", shuffle=False)
              .as_numpy_iterator())
  gen = synthetic.generate_examples("compose2_gen", "test", 16, seed=0)
  assert len(rows) == 16
  for row, ex in zip(rows, gen):
    assert row["inputs"].dtype == np.int32 and row["inputs"][-1] == 1
    assert vocabulary.decode(row["targets"].tolist()) == ex["targets"]
  assert task.predict_metric_fns == [prep.exact_match_accuracy]


def test_choice_task_rows_and_metric(vocabulary, synthetic_tasks):
  task = seqio.get_mixture_or_task("synthetic_compose2_choice")
  assert task.score_metric_fns == [prep.rank_classification_accuracy]
  rows = list(task.get_dataset({"inputs": 32, "targets": 24}, split="validation",
                               shuffle=False).as_numpy_iterator())
  gen = synthetic.generate_examples("compose2_choice", "validation", 16, seed=0)
  assert len(rows) == 4 * len(gen)
  targets = [task.postprocess_fn(r["targets_pretokenized"], example=r, is_target=True)
             for r in rows]
  for (ex_i, choice, correct), row in zip(targets, rows):
    assert correct == (gen[ex_i]["label"] == choice)
    assert row["targets_pretokenized"].decode() == gen[ex_i]["answer_choices"][choice]
  oracle = [1.0 if c else 0.0 for _, _, c in targets]
  assert task.score_metric_fns[0](targets, oracle)["accuracy"] == 100.0
  anti = [-s for s in oracle]
  assert task.score_metric_fns[0](targets, anti)["accuracy"] == 0.0
