"""The input check shared by the text metrics (ROUGE, BLEU, SQuAD): seqio passes ``targets`` and
``predictions`` lists, and a target may be one reference or a list of them.

No tensors here, so no einsum letters are used.
"""
from __future__ import annotations

from typing import Any, Sequence, Type


def reference_lists(targets: Sequence[Any], predictions: Sequence[Any], metric: str,
                    error: Type[Exception]) -> list[list[Any]]:
  """Each target as a non-empty list of references (a str / bytes target is one reference).

  Raises:
    error: ``"{metric}: N targets vs M predictions"``, ``"{metric}: no examples"`` or
      ``"{metric}: example i has no reference"``.
  """
  if len(targets) != len(predictions):
    raise error(f"{metric}: {len(targets)} targets vs {len(predictions)} predictions")
  if not targets:
    raise error(f"{metric}: no examples")
  out = []
  for i, target in enumerate(targets):
    refs = [target] if isinstance(target, (str, bytes)) else list(target)
    if not refs:
      raise error(f"{metric}: example {i} has no reference")
    out.append(refs)
  return out
