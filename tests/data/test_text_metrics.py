"""BLEU, ROUGE and SQuAD metrics against the widely used implementations, and the P3 validation
metrics PHATGOOSE's official scorer uses per dataset."""
import dataclasses
import json
import pathlib

import pytest

from phatgoose_jax.data import bleu, p3_tasks, rouge, squad
from phatgoose_jax.data import preprocessors as prep
from phatgoose_jax.data.catalog import p3 as p3_catalog
from phatgoose_jax.training import task_validation

REFERENCE = json.loads((pathlib.Path(__file__).parent.parent / "testdata" /
                        "text_metrics_reference.json").read_text())["cases"]


@pytest.mark.parametrize("case", REFERENCE, ids=[c["name"] for c in REFERENCE])
def test_bleu_and_rouge_match_sacrebleu_and_rouge_score(case):
  preds, refs = case["predictions"], case["references"]
  got = bleu.bleu(refs, preds)["bleu"]
  assert got == pytest.approx(case["bleu"], abs=1e-9)
  tokens = [bleu.tokenize_13a(t) for t in preds + refs]
  assert tokens == case["tokens"]
  for h, r, want in zip(preds, refs, case["rouge"]):
    assert rouge.score(r, h) == pytest.approx(want, abs=1e-12)
  means = rouge.rouge(refs, preds)
  for key in ("rouge1", "rouge2", "rougeL"):
    assert means[key] == pytest.approx(100 * sum(w[key] for w in case["rouge"]) / len(preds))
  assert rouge.rouge_l_only(refs, preds) == {"rougeL": means["rougeL"]}


def test_the_reference_covers_nonzero_and_zero_bleu():
  scores = [c["bleu"] for c in REFERENCE]
  assert min(scores) == 0.0 and sum(s > 30 for s in scores) >= 5


def test_bleu_by_hand_and_edge_cases():
  # one sentence, hypothesis = reference minus its last token: p1 = 1, p2..p4 = 1, BP < 1
  ref = "a b c d e f"
  hyp = "a b c d e"
  want = 100 * pow(2.718281828459045, 1 - 6 / 5)
  assert bleu.bleu([ref], [hyp])["bleu"] == pytest.approx(want)
  # several references: clipping takes the largest count in one reference, length the shortest
  refs = [["the the cat sat down", "a cat sat"]]
  hyps = [bleu.tokenize_13a("the the cat sat")]
  got = bleu.corpus_bleu([[bleu.tokenize_13a(r) for r in refs[0]]], hyps)
  # p1 = 4/4, p2 = 3/3, p3 = 2/2, p4 = 1/1; c = 4 > shortest r = 3 -> BP 1
  assert got == pytest.approx(1.0)
  assert bleu.bleu(["a b c d"], [""])["bleu"] == 0.0  # empty hypotheses: 0, not a crash
  assert bleu.bleu([b"a b c d e"], [b"a b c d e"])["bleu"] == pytest.approx(100.0)
  with pytest.raises(bleu.BleuError, match="2 targets vs 1"):
    bleu.bleu(["a", "b"], ["a"])
  with pytest.raises(bleu.BleuError, match="no examples"):
    bleu.bleu([], [])
  with pytest.raises(bleu.BleuError, match="example 0 has no reference"):
    bleu.bleu([[]], ["a"])


def test_squad_normalisation_em_and_f1():
  assert squad.normalize_answer("The  Eiffel-Tower, in Paris!") == "eiffeltower in paris"
  assert squad.normalize_answer(b"an apple a day") == "apple day"
  # 'the' removed, punctuation removed: exact match
  assert squad.squad(["Eiffel Tower"], ["the Eiffel tower."]) == {"exact_match": 100.0,
                                                                   "f1": 100.0}
  # prediction "red big car" vs "big red truck": shared {big, red} -> P = R = 2/3
  out = squad.squad(["big red truck"], ["red big car"])
  assert out["exact_match"] == 0.0 and out["f1"] == pytest.approx(100 * 2 / 3)
  # tokens are a multiset: 'x x y' shares one 'x' and the 'y' with 'x y' -> P = 2/3, R = 1
  out = squad.squad(["x y"], ["x x y"])
  assert out["f1"] == pytest.approx(100 * 2 * (2 / 3) * 1 / (2 / 3 + 1))
  # best reference per example; mean over examples
  out = squad.squad([["nothing", "blue whale"], "cat"], ["Blue whale", "dog"])
  assert out == {"exact_match": 50.0, "f1": 50.0}
  assert squad.squad(["a"], ["the"])["f1"] == 0.0  # both normalise to nothing: no shared token
  with pytest.raises(squad.SquadError, match="1 targets vs 2"):
    squad.squad(["a"], ["a", "b"])
  with pytest.raises(squad.SquadError, match="example 0 has no reference"):
    squad.squad([[]], ["a"])


def test_p3_validation_uses_the_official_metric_list():
  specs = {d.key: d for d in p3_catalog.P3_DATASETS}

  def names(key):
    return [f.__name__ for f in p3_tasks.validation_metrics(specs[key])["metric_fns"]]

  assert names("xsum") == ["bleu", "rouge_l_only"]  # ('bleu', 'rouge')
  assert names("samsum") == ["rouge_l_only"]
  # official gin: metrics ['blue', 'rouge'], the misspelling is ignored by its Scorer
  assert names("hotpot_qa") == ["rouge_l_only"]
  assert names("ropes") == names("quoref") == ["squad"]
  assert names("quarel") == ["rank_classification_accuracy"]
  for spec in p3_catalog.P3_DATASETS:  # every generative dataset gets its listed metrics
    if spec.eval_interface == "gen":
      assert len(names(spec.key)) == len(spec.eval_metrics)
  # a generative dataset without squad/bleu/rouge in its list falls back to exact match
  other = dataclasses.replace(specs["xsum"], eval_metrics=("accuracy",))
  assert p3_tasks.validation_metrics(other)["metric_fns"] == [prep.exact_match_accuracy]


def test_dataset_score_averages_the_official_metrics():
  """The dataset's validation score is the mean of what its metrics report: (EM + F1) / 2 for a
  squad dataset, (BLEU + ROUGE-L) / 2 for a bleu+rouge one (the official scorer's dict mean)."""
  targets, preds = ["big red truck", "blue whale"], ["red big car", "blue whale"]
  em_f1 = squad.squad(targets, preds)
  scores = task_validation.validation_scores({"p3_ropes": em_f1})
  assert scores["p3_ropes/score"] == pytest.approx((em_f1["exact_match"] + em_f1["f1"]) / 2)
  refs, hyps = ["the cat sat on the mat today", "a b c d e"], ["the cat sat on a mat", "a b c d e"]
  metrics = {**bleu.bleu(refs, hyps), **rouge.rouge_l_only(refs, hyps)}
  scores = task_validation.validation_scores({"p3_xsum": metrics})
  assert scores["p3_xsum/score"] == pytest.approx((metrics["bleu"] + metrics["rougeL"]) / 2)
  assert scores["average_score"] == scores["p3_xsum/score"]


def test_p3_validation_decode_budgets_are_the_official_ones():
  """Every generative P3 dataset has its p3_t5xl.gin max_gen_length; decoding stops one token
  earlier (HF generate counts the start token); choice datasets record none."""
  from phatgoose_jax.data import registry  # pylint: disable=g-import-not-at-top
  gen = {d.key for d in p3_catalog.P3_DATASETS if d.eval_interface == "gen"}
  assert set(p3_catalog.P3_EVAL_MAX_GEN_LENGTH) == gen
  specs = {d.key: d for d in p3_catalog.P3_DATASETS}
  p3_tasks.set_validation_decode_length("probe_ropes", specs["ropes"])
  p3_tasks.set_validation_decode_length("probe_quarel", specs["quarel"])
  assert registry.decode_length("probe_ropes") == 15  # max_gen_length 16
  assert registry.decode_length("probe_quarel") is None
  assert p3_catalog.P3_EVAL_MAX_GEN_LENGTH["xsum"] == 256
