"""Arrow prototypes for every expert and site of a library (Ostapenko et al. 2024, sec. 4 "Arrow").

Letters: E experts, D site input, F site output, R LoRA rank.

Arrow needs no data: the router vector of expert e at a site is the top input-space singular
direction of its update ``dW_e = A_e B_e`` [D, F] (`phatgoose_jax.routing.arrow_prototypes`; the
positive LoRA scale does not change it). PHATGOOSE's Arrow baseline stores exactly this vector
(r-three/phatgoose ``scripts/manipulations.py``, ``create_router_embeddings_from_weights`` with
``method_type="top1_eigen_weighted_vector"``: ``U[:, 0]`` of ``svd(layer1 @ layer2)``). Here the
vectors are stored in the expert library as kind ``'arrow'`` (`ExpertLibrary.set_vectors`), so a
routed model reads them with ``ExpertLibrary.stack(vectors='arrow')`` and router ``'arrow'`` (or
``'arrow_phatgoose'`` for the variant PHATGOOSE ran, see `phatgoose_jax.routing.arrow`).
"""
from __future__ import annotations

import functools
from typing import Dict, Mapping, Optional, Sequence

import jax
import numpy as np

from phatgoose_jax import routing as rt
from phatgoose_jax.library import ExpertLibrary, LibraryError

ARROW_KIND = "arrow"


@functools.partial(jax.jit, static_argnames=("method",))
def _prototypes(a, b, method):
  # One compiled program per (shapes, method) for the whole library (a fresh jit per expert
  # recompiled every site shape of every expert).
  return rt.arrow_prototypes(a, b, method=method)


def expert_arrow_vectors(lora: Mapping[str, Mapping[str, np.ndarray]],
                         method: str = "qr") -> Dict[str, np.ndarray]:
  """Arrow prototype of one expert at each of its sites.

  Args:
    lora: ``{site: {'lora_a': [D, R], 'lora_b': [R, F]}}``.
    method: `routing.arrow_prototypes` method ('qr' or 'explicit').

  Returns:
    ``{site: [D]}`` float32 unit vectors (sign fixed: largest-magnitude entry positive).
  """
  if not lora:
    raise LibraryError("expert_arrow_vectors: lora has no sites")
  out = {}
  for site, ab in lora.items():
    if "lora_a" not in ab or "lora_b" not in ab:
      raise LibraryError(f"expert_arrow_vectors: site {site!r} lacks lora_a/lora_b")
    a = np.asarray(ab["lora_a"], np.float32)[None]  # [1, D, R]
    b = np.asarray(ab["lora_b"], np.float32)[None]  # [1, R, F]
    out[site] = np.asarray(_prototypes(a, b, method))[0].astype(np.float32)  # [D]
  return out


def compute_arrow_vectors(library: ExpertLibrary, names: Optional[Sequence[str]] = None,
                          kind: str = ARROW_KIND, method: str = "qr",
                          skip_existing: bool = False) -> Dict[str, Dict[str, np.ndarray]]:
  """Computes and stores (``set_vectors(name, kind, ...)``) Arrow prototypes of library experts.

  Args:
    library: the expert library (entries rewritten atomically).
    names: experts to process (default: all).
    kind: vector kind to store (default 'arrow').
    method: SVD path of `routing.arrow_prototypes`.
    skip_existing: leave experts that already have ``kind`` vectors untouched.

  Returns:
    ``{name: {site: [D]}}`` of the experts processed.
  """
  names = library.names() if names is None else list(names)
  done = {}
  for name in names:
    if skip_existing and kind in library.metadata(name).get("vectors", []):
      continue
    expert = library.load(name)
    vectors = expert_arrow_vectors(expert.lora, method=method)
    library.set_vectors(name, kind, vectors,
                        provenance={"method": "arrow", "svd": method,
                                    "reference": "Ostapenko et al. 2024, sec. 4"})
    done[name] = vectors
  return done


__all__ = ["ARROW_KIND", "compute_arrow_vectors", "expert_arrow_vectors"]
