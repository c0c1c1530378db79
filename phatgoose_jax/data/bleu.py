"""Corpus BLEU as PHATGOOSE's P3 validation computes it (HF ``evaluate``'s "bleu"), dependency free.

PHATGOOSE scores the generative P3 datasets whose official metric list has "bleu" (e.g. wiki_bio,
common_gen, the summarisation sets) with ``evaluate.load("bleu")`` (``r-three/phatgoose:
src/data/metrics.py``). That metric is Papineni et al. (2002) corpus BLEU in the form of the
TensorFlow NMT tutorial's ``compute_bleu``, on sacrebleu's ``13a`` tokenisation:

* tokens: sacrebleu's ``13a`` tokenizer (the WMT ``mteval-v13a`` rules: unescape ``&quot; &amp;
  &lt; &gt;``, split punctuation off words, periods and commas only when not between digits),
  case kept;
* n-gram precisions for n = 1..4 pooled over the corpus, each hypothesis n-gram clipped by its
  largest count in any one reference; no smoothing, so BLEU is 0 when some order has no match;
* brevity penalty ``exp(1 - r / c)`` when the hypotheses' total length ``c`` is at most the
  reference length ``r``, which sums each example's **shortest** reference (sacrebleu uses the
  closest one; the two agree with one reference per example, as P3 has).

Differences from ``evaluate``: BLEU is 0 when every hypothesis is empty (``compute_bleu`` divides
by zero there), and the value is in percent (``evaluate`` reports [0, 1]); seqio metrics report
percent, and a validation score averages metrics of one scale. No tensors here, so no einsum
letters are used.
"""
from __future__ import annotations

import collections
import math
import re
from typing import Sequence, Union

from phatgoose_jax.data.references import reference_lists

Text = Union[str, bytes]

MAX_ORDER = 4

# mteval-v13a: punctuation other than . , becomes its own token; . and , split unless they sit
# between digits (1,000 and 3.14 stay whole); a dash after a digit splits.
_13A_RULES = (
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),
)


class BleuError(ValueError):
  """Mismatched or empty inputs to the BLEU metric."""


def _text(value: Text) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def tokenize_13a(text: Text) -> list[str]:
  """sacrebleu's ``13a`` tokens of one string (case kept)."""
  line = _text(text).replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
  if "&" in line:
    line = (line.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<")
            .replace("&gt;", ">"))
  line = f" {line} "
  for pattern, repl in _13A_RULES:
    line = pattern.sub(repl, line)
  return line.split()


def _ngram_counts(tokens: Sequence[str], max_order: int) -> collections.Counter:
  counts: collections.Counter = collections.Counter()
  for n in range(1, max_order + 1):
    for i in range(len(tokens) - n + 1):
      counts[tuple(tokens[i:i + n])] += 1
  return counts


def corpus_bleu(references: Sequence[Sequence[Sequence[str]]],
                hypotheses: Sequence[Sequence[str]], max_order: int = MAX_ORDER) -> float:
  """Corpus BLEU in [0, 1] of tokenised hypotheses against lists of tokenised references.

  Args:
    references: per example, its references (each a token list; at least one).
    hypotheses: per example, the hypothesis token list.
    max_order: the longest n-gram (4).

  Returns:
    ``BP * exp(mean_n log p_n)``; 0 when a precision is 0 or every hypothesis is empty.
  """
  matches = [0] * max_order
  possible = [0] * max_order
  ref_len = hyp_len = 0
  for refs, hyp in zip(references, hypotheses):
    ref_len += min(len(r) for r in refs)
    hyp_len += len(hyp)
    clip: collections.Counter = collections.Counter()
    for ref in refs:
      clip |= _ngram_counts(ref, max_order)  # max count over the references
    for gram, count in (_ngram_counts(hyp, max_order) & clip).items():
      matches[len(gram) - 1] += count
    for n in range(1, max_order + 1):
      possible[n - 1] += max(0, len(hyp) - n + 1)
  precisions = [m / p if p > 0 else 0.0 for m, p in zip(matches, possible)]
  if hyp_len == 0 or min(precisions) <= 0.0:
    return 0.0
  geo_mean = math.exp(sum(math.log(p) for p in precisions) / max_order)
  ratio = hyp_len / ref_len if ref_len else float("inf")
  brevity = 1.0 if ratio > 1.0 else math.exp(1.0 - 1.0 / ratio)
  return geo_mean * brevity


def bleu(targets: Sequence[Union[Text, Sequence[Text]]],
         predictions: Sequence[Text]) -> dict[str, float]:
  """seqio metric: ``{'bleu': corpus BLEU in percent}``; a target may list several references.

  Raises:
    BleuError: when the lengths differ, there are no examples, or an example has no reference.
  """
  refs = [[tokenize_13a(r) for r in group]
          for group in reference_lists(targets, predictions, "bleu", BleuError)]
  hyps = [tokenize_13a(p) for p in predictions]
  return {"bleu": 100.0 * corpus_bleu(refs, hyps)}
