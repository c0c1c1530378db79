"""SQuAD exact match and F1 as PHATGOOSE's P3 validation computes them, dependency free.

PHATGOOSE scores the extractive-QA P3 datasets whose official metric list has "squad" (ROPES,
Quoref, DuoRC) with ``evaluate.load("squad")`` (``r-three/phatgoose: src/data/metrics.py``), the
SQuAD v1.1 evaluation script (Rajpurkar et al., 2016):

* answers are normalised: lowercased, ASCII punctuation (``string.punctuation``) removed, the
  words "a", "an", "the" removed, whitespace collapsed;
* exact match: the normalised prediction equals a normalised reference;
* F1: the harmonic mean of precision and recall of the whitespace tokens the prediction shares
  with a reference (multiset overlap), 0 without shared tokens;
* each example takes its best reference; both scores are means over examples, in percent (the
  official scorer divides by 100; seqio metrics report percent).

P3's rows carry one target per example, so there is one reference where the official code may
list several answers. No tensors here, so no einsum letters are used.
"""
from __future__ import annotations

import collections
import re
import string
from typing import Sequence, Union

from phatgoose_jax.data.references import reference_lists

Text = Union[str, bytes]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


class SquadError(ValueError):
  """Mismatched or empty inputs to the SQuAD metric."""


def normalize_answer(text: Text) -> str:
  """Lowercase, drop punctuation, drop articles, collapse whitespace (SQuAD v1.1)."""
  text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
  text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
  return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(reference: Text, prediction: Text) -> float:
  return float(normalize_answer(reference) == normalize_answer(prediction))


def f1(reference: Text, prediction: Text) -> float:
  """Token-overlap F1 in [0, 1] of one pair (normalised whitespace tokens)."""
  pred = normalize_answer(prediction).split()
  ref = normalize_answer(reference).split()
  shared = sum((collections.Counter(pred) & collections.Counter(ref)).values())
  if shared == 0:
    return 0.0
  precision, recall = shared / len(pred), shared / len(ref)
  return 2.0 * precision * recall / (precision + recall)


def squad(targets: Sequence[Union[Text, Sequence[Text]]],
          predictions: Sequence[Text]) -> dict[str, float]:
  """seqio metric: ``{'exact_match': %, 'f1': %}``; a target may list several references.

  Raises:
    SquadError: when the lengths differ, there are no examples, or an example has no reference.
  """
  em = f = 0.0
  for refs, pred in zip(reference_lists(targets, predictions, "squad", SquadError), predictions):
    em += max(exact_match(r, pred) for r in refs)
    f += max(f1(r, pred) for r in refs)
  return {"exact_match": 100.0 * em / len(targets), "f1": 100.0 * f / len(targets)}
