"""Writes tests/testdata/text_metrics_reference.json: BLEU and ROUGE of small corpora computed
by the widely used implementations (sacrebleu, Google's rouge-score).

The references the tests compare `phatgoose_jax.data.bleu` and `phatgoose_jax.data.rouge` with.
Neither package is a dependency of the project; run this with both on PYTHONPATH, e.g.

  pip install --target /tmp/metrics sacrebleu==2.4.3 rouge-score==0.1.2
  PYTHONPATH=/tmp/metrics python scripts/make_text_metric_fixture.py

BLEU: sacrebleu's ``corpus_bleu(..., smooth_method='none', tokenize='13a')`` (percent). Every
example has one reference, where sacrebleu's closest-reference length equals the
shortest-reference length of the ``evaluate`` metric PHATGOOSE uses. ROUGE: per example
``RougeScorer(['rouge1', 'rouge2', 'rougeL'], use_stemmer=False).score(reference, prediction)``
F-measures.
"""
import json
import os
import random
import sys

from rouge_score import rouge_scorer
import sacrebleu
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests",
                   "testdata", "text_metrics_reference.json")

WORDS = ("the cat sat on a mat , it was 3.14 or 1,000 km-long . Dogs &amp; cats ( maybe ) "
         "said : \"yes\" ! why ? 42-year-old The Cat re-entered e.g. U.S. 5-4 &quot;q&quot; "
         "x/y a+b @home #tag 100% $5").split()


def _sentence(rng, n):
  return " ".join(rng.choice(WORDS) for _ in range(n))


def _corpora():
  rng = random.Random(20261126)
  yield "hand", ["The cat sat on the mat.", "It costs $1,000.50 - really!",
                 "He said &quot;hi&quot; &amp; left"], [
                     "The cat sat on a mat.", "It costs $1,000.50 - really!",
                     "He said \"hi\" & left quickly"]
  yield "short_hyp", ["the cat sat on", "a dog ran far"], [
      "the cat sat on the mat", "a dog ran far away today"]
  yield "long_hyp", ["the cat sat on the mat and the mat sat on the cat"], [
      "the cat sat on the mat"]
  yield "no_4gram", ["a b c", "d e f"], ["a b c", "d e f"]
  yield "case", ["The Cat Sat On The Mat Today"], ["the cat sat on the mat today"]
  for i in range(6):
    refs, hyps = [], []
    for _ in range(rng.randint(1, 12)):
      ref = _sentence(rng, rng.randint(4, 25))
      toks = ref.split()
      hyp = [t if rng.random() < 0.7 else rng.choice(WORDS) for t in toks]
      if rng.random() < 0.3:
        hyp = hyp[: max(1, len(hyp) // 2)]
      if rng.random() < 0.2:
        hyp = hyp + hyp[:3]
      refs.append(ref)
      hyps.append(" ".join(hyp))
    yield f"random_{i}", hyps, refs


def main():
  cases = []
  tok = Tokenizer13a()
  for name, hyps, refs in _corpora():
    score = sacrebleu.corpus_bleu(hyps, [refs], smooth_method="none", tokenize="13a")
    cases.append({"name": name, "predictions": hyps, "references": refs,
                  "bleu": score.score,
                  "tokens": [tok(h).split() for h in hyps] + [tok(r).split() for r in refs]})
  scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
  for case in cases:
    case["rouge"] = [{k: v.fmeasure for k, v in scorer.score(r, h).items()}
                     for h, r in zip(case["predictions"], case["references"])]
  with open(OUT, "w") as f:
    json.dump({"generator": f"sacrebleu {sacrebleu.__version__} corpus_bleu(smooth_method="
                            "'none', tokenize='13a'); rouge-score RougeScorer(use_stemmer=False)",
               "cases": cases}, f, indent=1)
    f.write("\n")
  print(f"wrote {len(cases)} cases to {OUT}", file=sys.stderr)


if __name__ == "__main__":
  main()
