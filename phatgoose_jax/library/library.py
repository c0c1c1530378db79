"""The expert library: a directory of LoRA experts for one base T5, and stacking them for routing.

PHATGOOSE (Muqeeth et al., ICML 2024, sec. 3) recycles independently trained LoRA experts: each
contributor trains a LoRA on its task (stage 1), then a sigmoid gate vector per LoRA site with the
LoRA frozen (stage 2); the gates become the router's expert embeddings at inference (stage 3). The
library holds the result of stages 1-2 per expert, plus any other per-site router vectors (Average
Activation or Arrow prototypes) computed later with `ExpertLibrary.set_vectors`, and turns a
selection of experts into the ``[E, ...]`` arrays of the ``adapters`` collection of a routed model
(see ``docs`` / the adapters contract): at every site ``lora_a`` [E, D, R], ``lora_b``
[E, R, F], ``gates`` [E, D] and ``scale`` [E].

Convention: Δ(u) = (u @ lora_a) @ lora_b * scale (t5x kernel layout, [in, out]). The official code
(r-three/phatgoose, ``FFNExperts`` with ``divide_by_d_bottleneck=True``) uses scale = 1/R; HF PEFT
uses lora_alpha/r. Each expert keeps its own scale, so both kinds can live in one library.

Experts of different ranks are stacked by zero-padding to the largest rank R: lora_a gets zero
columns and lora_b zero rows, so u @ [A 0] @ [B; 0] = u @ A @ B exactly (the extra products are
exact zeros).

Compatibility: a library is bound to one base model (its parameter fingerprint) and one T5 config.
The first expert added fixes the library's site list unless `create` was given one; a library may
also pin a rank. An expert whose base fingerprint, site dims, sites or rank disagree is refused
with a `LibraryError` naming the expert and the field.

Letters: E experts, D site input width, F site output width, R LoRA rank.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from phatgoose_jax.library import format as fmt
from phatgoose_jax.library.format import LibraryError
from phatgoose_jax.library.format import site_shapes
from phatgoose_jax.library.trees import place_stacked
from phatgoose_jax.models.config import T5Config

Array = Any
LoRA = Mapping[str, Mapping[str, Array]]   # {site: {'lora_a': [D, R], 'lora_b': [R, F]}}
Vectors = Mapping[str, Array]              # {site: [D]}
Stacked = Dict[str, Dict[str, np.ndarray]]

@dataclasses.dataclass(frozen=True)
class Expert:
  """One expert as loaded from the library (numpy arrays).

  Attributes:
    name: entry name.
    task: the task it was trained on (free text, may be None).
    rank: R.
    scale: multiplier of (u @ lora_a) @ lora_b.
    lora: ``{site: {'lora_a': [D, R], 'lora_b': [R, F]}}``.
    vectors: ``{kind: {site: [D]}}`` e.g. ``{'gate': {...}}``.
    metadata: the entry's metadata.json.
  """
  name: str
  task: Optional[str]
  rank: int
  scale: float
  lora: Dict[str, Dict[str, np.ndarray]]
  vectors: Dict[str, Dict[str, np.ndarray]]
  metadata: Dict[str, Any]


def _non_library_leftovers(path: str) -> list:
  """Entries of ``path`` other than what an interrupted `create` leaves (an empty ``experts/``,
  a temporary ``library.json``), which a new `create` may reuse."""
  def leftover(name: str) -> bool:
    full = os.path.join(path, name)
    return ((name == fmt.EXPERTS_DIR and os.path.isdir(full) and not os.listdir(full))
            or name.startswith(f".{fmt.LIBRARY_FILE}.tmp-"))
  return [n for n in os.listdir(path) if not leftover(n)]


class ExpertLibrary:
  """A directory of LoRA experts for one base model (see `phatgoose_jax.library.format`).

  Not safe for concurrent writers: mutations re-read ``library.json`` and rewrite it atomically,
  but two processes adding at once may lose one name (the entry directory stays on disk and
  `check` reports it).
  """

  def __init__(self, path: str, index: Dict[str, Any]):
    """Use `create` or `open`."""
    self.path = os.fspath(path)
    self._index = index

  # -- construction --------------------------------------------------------------------------

  @classmethod
  def create(cls, path: str, base_fingerprint: Any, t5_config: Union[T5Config, Mapping[str, Any]],
             sites: Optional[Sequence[str]] = None, rank: Optional[int] = None,
             exist_ok: bool = False) -> "ExpertLibrary":
    """Creates an empty library at ``path``.

    Args:
      path: directory to create (may exist if empty).
      base_fingerprint: the base model's ``params_fingerprint`` string, or its params tree.
      t5_config: the base model's T5Config (or its ``to_dict()``).
      sites: pin the site list (default: fixed by the first expert added).
      rank: pin every expert's rank (default: any; mixed ranks are zero-padded by `stack`).
      exist_ok: open an existing library at ``path`` if its fingerprint and config match.
    """
    path = os.fspath(path)
    config = fmt.as_config(t5_config)
    fingerprint = fmt.as_fingerprint(base_fingerprint)
    if os.path.exists(os.path.join(path, fmt.LIBRARY_FILE)):
      if not exist_ok:
        raise LibraryError(f"{path} already holds an expert library (open it, or create a new "
                           "one elsewhere)")
      lib = cls.open(path)
      if lib.base_fingerprint != fingerprint:
        raise LibraryError(f"{path}: field 'base_fingerprint' is {lib.base_fingerprint}, not "
                           f"{fingerprint}")
      if lib.t5_config.to_dict() != config.to_dict():
        raise LibraryError(f"{path}: field 't5_config' differs from the given config")
      return lib
    if os.path.isdir(path) and _non_library_leftovers(path):
      raise LibraryError(f"cannot create an expert library in non-empty directory {path}")
    all_sites = site_shapes(config)
    if sites is not None:
      unknown = [s for s in sites if s not in all_sites]
      if unknown or not sites:
        raise LibraryError(f"sites: unknown site(s) {unknown} for this T5 config" if unknown
                           else "sites must not be empty")
      sites = [s for s in all_sites if s in set(sites)]
    if rank is not None and (not isinstance(rank, int) or rank <= 0):
      raise LibraryError(f"rank must be a positive int or None, got {rank!r}")
    os.makedirs(os.path.join(path, fmt.EXPERTS_DIR), exist_ok=True)
    index = {"format": fmt.LIBRARY_FORMAT, "format_version": fmt.FORMAT_VERSION,
             "base_fingerprint": fingerprint, "t5_config": config.to_dict(),
             "sites": sites, "rank": rank, "experts": [], "created": fmt.now_iso()}
    fmt.write_json_atomic(os.path.join(path, fmt.LIBRARY_FILE), index)
    return cls(path, index)

  @classmethod
  def open(cls, path: str) -> "ExpertLibrary":
    """Opens an existing library (reads ``library.json`` only; entries are verified on load)."""
    path = os.fspath(path)
    return cls(path, cls._read_index(path))

  @staticmethod
  def _read_index(path: str) -> Dict[str, Any]:
    file = os.path.join(path, fmt.LIBRARY_FILE)
    if not os.path.isdir(path):
      raise LibraryError(f"expert library {path} does not exist")
    index = fmt.read_json(file, "expert library")
    for field in ("format", "format_version", "base_fingerprint", "t5_config", "sites", "rank",
                  "experts"):
      if field not in index:
        raise LibraryError(f"{file}: missing field {field!r}")
    if index["format"] != fmt.LIBRARY_FORMAT:
      raise LibraryError(f"{file}: field 'format' is {index['format']!r}, expected "
                         f"{fmt.LIBRARY_FORMAT!r}")
    if index["format_version"] != fmt.FORMAT_VERSION:
      raise LibraryError(f"{file}: field 'format_version' is {index['format_version']!r}; this "
                         f"phatgoose_jax reads version {fmt.FORMAT_VERSION}")
    fmt.as_config(index["t5_config"])
    experts = index["experts"]
    if (not isinstance(experts, list) or not all(isinstance(n, str) for n in experts)
        or len(set(experts)) != len(experts)):
      raise LibraryError(f"{file}: field 'experts' must be a list of distinct names, got "
                         f"{experts!r}")
    sites = index["sites"]
    if sites is not None and (not isinstance(sites, list)
                              or not all(isinstance(n, str) for n in sites)):
      raise LibraryError(f"{file}: field 'sites' must be null or a list of site names, got "
                         f"{sites!r}")
    rank = index["rank"]
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
      raise LibraryError(f"{file}: field 'rank' must be null or a positive int, got {rank!r}")
    return index

  def _reload(self) -> None:
    self._index = self._read_index(self.path)

  def _write_index(self) -> None:
    fmt.write_json_atomic(os.path.join(self.path, fmt.LIBRARY_FILE), self._index)

  # -- properties ----------------------------------------------------------------------------

  @property
  def experts_dir(self) -> str:
    return os.path.join(self.path, fmt.EXPERTS_DIR)

  @property
  def base_fingerprint(self) -> str:
    return self._index["base_fingerprint"]

  @property
  def t5_config(self) -> T5Config:
    return fmt.as_config(self._index["t5_config"])

  @property
  def sites(self) -> Optional[List[str]]:
    """The library's pinned site list (None until the first expert is added)."""
    return None if self._index["sites"] is None else list(self._index["sites"])

  @property
  def rank(self) -> Optional[int]:
    return self._index["rank"]

  def names(self) -> List[str]:
    """Expert names in library order (the E order of `stack`)."""
    return list(self._index["experts"])

  def __len__(self) -> int:
    return len(self._index["experts"])

  def __contains__(self, name: str) -> bool:
    return name in self._index["experts"]

  def __iter__(self) -> Iterator[str]:
    return iter(self.names())

  def __repr__(self) -> str:
    return f"ExpertLibrary({self.path!r}, {len(self)} experts)"

  # -- validation ----------------------------------------------------------------------------

  def _check_vectors(self, name: str, kind: str, vectors: Vectors, sites: Sequence[str]
                     ) -> Dict[str, np.ndarray]:
    shapes = fmt.site_shapes(self.t5_config)
    if not isinstance(vectors, Mapping):
      raise LibraryError(f"expert {name!r}: field {kind!r} must be a dict site -> [D] array")
    extra, missing = sorted(set(vectors) - set(sites)), [s for s in sites if s not in vectors]
    if extra or missing:
      raise LibraryError(f"expert {name!r}: field {kind!r}: sites differ from the expert's "
                         f"(unexpected {extra}, missing {missing})")
    out = {}
    for site in sites:
      v = fmt.float_array(vectors[site], f"expert {name!r}: field {kind!r} at {site}")
      if v.shape != (shapes[site][0],):
        raise LibraryError(f"expert {name!r}: field {kind!r} at {site} has shape "
                           f"{list(v.shape)}, expected [{shapes[site][0]}] (D)")
      out[site] = v
    return out

  def _check_lora(self, name: str, lora: LoRA) -> Tuple[List[str], int, Dict[str, np.ndarray]]:
    """Validates an expert's LoRA against the library; returns (sites, rank, flat tensors)."""
    shapes = fmt.site_shapes(self.t5_config)
    if not isinstance(lora, Mapping) or not lora:
      raise LibraryError(f"expert {name!r}: field 'lora' must be a non-empty dict "
                         "site -> {'lora_a', 'lora_b'}")
    unknown = sorted(s for s in lora if s not in shapes)
    if unknown:
      raise LibraryError(f"expert {name!r}: field 'sites': unknown site(s) {unknown} for the "
                         "library's T5 config")
    sites = [s for s in shapes if s in lora]
    pinned = self.sites
    if pinned is not None and sites != pinned:
      raise LibraryError(
          f"expert {name!r}: field 'sites' disagrees with the library (missing "
          f"{[s for s in pinned if s not in lora]}, unexpected "
          f"{[s for s in sites if s not in pinned]})")
    tensors: Dict[str, np.ndarray] = {}
    rank = None
    for site in sites:
      leaves = lora[site]
      if not isinstance(leaves, Mapping) or set(leaves) != set(fmt.LORA_KEYS):
        got = sorted(leaves) if isinstance(leaves, Mapping) else type(leaves).__name__
        raise LibraryError(f"expert {name!r}: site {site} must map to exactly 'lora_a' and "
                           f"'lora_b' (got {got}); pass gates/vectors separately")
      a = fmt.float_array(leaves["lora_a"], f"expert {name!r}: field 'lora_a' at {site}")
      b = fmt.float_array(leaves["lora_b"], f"expert {name!r}: field 'lora_b' at {site}")
      d, f = shapes[site]
      if a.ndim != 2 or a.shape[0] != d:
        raise LibraryError(f"expert {name!r}: field 'lora_a' at {site} has shape "
                           f"{list(a.shape)}, expected [{d}, R] (D={d})")
      if b.ndim != 2 or b.shape[1] != f or b.shape[0] != a.shape[1]:
        raise LibraryError(f"expert {name!r}: field 'lora_b' at {site} has shape "
                           f"{list(b.shape)}, expected [{a.shape[1]}, {f}] (R, F={f})")
      if rank is None:
        rank = a.shape[1]
      elif a.shape[1] != rank:
        raise LibraryError(f"expert {name!r}: field 'rank': site {site} has rank {a.shape[1]}, "
                           f"other sites {rank}")
      tensors[f"{site}/lora_a"] = a
      tensors[f"{site}/lora_b"] = b
    if rank == 0:
      raise LibraryError(f"expert {name!r}: field 'rank' must be positive")
    if self.rank is not None and rank != self.rank:
      raise LibraryError(f"expert {name!r}: field 'rank' is {rank}, the library pins rank "
                         f"{self.rank}")
    return sites, rank, tensors

  # -- mutation ------------------------------------------------------------------------------

  def add(self, name: str, lora: LoRA, scale: float, *, task: Optional[str] = None,
          gates: Optional[Vectors] = None, vectors: Optional[Mapping[str, Vectors]] = None,
          provenance: Optional[Mapping[str, Any]] = None, base_fingerprint: Optional[str] = None,
          overwrite: bool = False, extra_metadata: Optional[Mapping[str, Any]] = None
          ) -> Dict[str, Any]:
    """Adds (or with ``overwrite`` replaces) one expert; other entries are never touched.

    Args:
      name: entry name (a directory name; see `format.validate_name`).
      lora: ``{site: {'lora_a': [D, R], 'lora_b': [R, F]}}``, numpy or jax arrays (dtype kept).
      scale: Δ(u) = (u @ lora_a) @ lora_b * scale.
      task: the task trained on (free text).
      gates: optional PHATGOOSE gates ``{site: [D]}`` (stored as kind 'gate').
      vectors: optional other kinds ``{kind: {site: [D]}}``.
      provenance: e.g. ``{'source': path, 'training_run': ..., 'import_kind': 'hf_peft'}``;
        ``created`` is added.
      base_fingerprint: the base model the expert was trained on (default: the library's). A
        different fingerprint is refused.
      overwrite: replace an existing entry of that name (keeps its position in the order).
      extra_metadata: free JSON-serialisable metadata stored under ``extra``.

    Returns:
      The metadata written.
    """
    fmt.validate_name(name)
    self._reload()
    if base_fingerprint is not None and base_fingerprint != self.base_fingerprint:
      raise LibraryError(f"expert {name!r}: field 'base_fingerprint' is {base_fingerprint}, the "
                         f"library's base model is {self.base_fingerprint}")
    if name in self._index["experts"] and not overwrite:
      raise LibraryError(f"expert {name!r} already exists in {self.path}; replace it with "
                         "--overwrite (CLI) / overwrite=True")
    try:
      scale = float(scale)
    except (TypeError, ValueError):
      raise LibraryError(f"expert {name!r}: field 'scale' must be a number, got {scale!r}"
                         ) from None
    if not np.isfinite(scale):
      raise LibraryError(f"expert {name!r}: field 'scale' must be finite, got {scale}")
    sites, rank, tensors = self._check_lora(name, lora)
    all_vectors = dict(vectors or {})
    if gates is not None:
      if "gate" in all_vectors:
        raise LibraryError(f"expert {name!r}: gates given twice (gates= and vectors['gate'])")
      all_vectors["gate"] = gates
    for kind, vecs in sorted(all_vectors.items()):
      fmt.validate_kind(kind)
      for site, v in self._check_vectors(name, kind, vecs, sites).items():
        tensors[f"{site}/{kind}"] = v
    prov = dict(provenance or {})
    prov.setdefault("created", fmt.now_iso())
    metadata = {
        "format": fmt.ENTRY_FORMAT, "format_version": fmt.FORMAT_VERSION, "name": name,
        "task": task, "rank": int(rank), "scale": scale, "sites": sites,
        "vectors": sorted(all_vectors), "vector_provenance": {},
        "base_fingerprint": self.base_fingerprint, "provenance": prov,
        "extra": dict(extra_metadata or {}),
    }
    written = fmt.write_entry(self.experts_dir, name, tensors, metadata, overwrite=overwrite)
    self._reload()
    changed = False
    if name not in self._index["experts"]:
      self._index["experts"].append(name)
      changed = True
    if self._index["sites"] is None:
      self._index["sites"] = sites
      changed = True
    if changed:
      self._write_index()
    return written

  def set_vectors(self, name: str, kind: str, vectors: Vectors,
                  provenance: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Stores (or replaces) per-site vectors of ``kind`` for an existing expert.

    E.g. kind='gate' after PHATGOOSE gate training, 'average_activation' or 'arrow' (the kinds
    `methods.average_activation` and `methods.arrow` store). The entry is rewritten atomically with its LoRA bytes unchanged.
    """
    fmt.validate_kind(kind)
    self._reload()
    self._require(name)
    meta, tensors = fmt.read_entry(self.experts_dir, name)
    checked = self._check_vectors(name, kind, vectors, meta["sites"])
    for site, v in checked.items():
      tensors[f"{site}/{kind}"] = v
    meta = {k: v for k, v in meta.items() if k not in ("arrays", "weights_sha256")}
    meta["vectors"] = sorted(set(meta["vectors"]) | {kind})
    prov = dict(provenance or {})
    prov.setdefault("created", fmt.now_iso())
    meta.setdefault("vector_provenance", {})[kind] = prov
    return fmt.write_entry(self.experts_dir, name, tensors, meta, overwrite=True)

  def remove(self, name: str) -> None:
    """Removes an expert: first from the order in ``library.json``, then its directory."""
    self._reload()
    self._require(name)
    self._index["experts"].remove(name)
    self._write_index()
    entry = os.path.join(self.experts_dir, name)
    if os.path.lexists(entry):
      trash = tempfile.mkdtemp(prefix=f".{name}.old-", dir=self.experts_dir)
      os.rmdir(trash)
      os.replace(entry, trash)
      shutil.rmtree(trash, ignore_errors=True)

  # -- reading -------------------------------------------------------------------------------

  def _require(self, name: str) -> None:
    if name not in self._index["experts"]:
      raise LibraryError(f"expert {name!r} is not in the library {self.path} "
                         f"(experts: {self.names()})")

  def metadata(self, name: str) -> Dict[str, Any]:
    """The entry's metadata.json (weights are not read or verified)."""
    self._require(name)
    return fmt.read_entry(self.experts_dir, name, verify=False)[0]

  def load(self, name: str) -> Expert:
    """Reads and verifies one expert (sha256, shapes, fingerprint, sites, rank)."""
    self._require(name)
    meta, tensors = fmt.read_entry(self.experts_dir, name)
    if meta["base_fingerprint"] != self.base_fingerprint:
      raise LibraryError(f"expert {name!r}: field 'base_fingerprint' is "
                         f"{meta['base_fingerprint']}, the library's is {self.base_fingerprint}")
    shapes = fmt.site_shapes(self.t5_config)
    sites = meta["sites"]
    if self.sites is not None and list(sites) != self.sites:
      raise LibraryError(f"expert {name!r}: field 'sites' disagrees with the library")
    lora: Dict[str, Dict[str, np.ndarray]] = {}
    vectors: Dict[str, Dict[str, np.ndarray]] = {k: {} for k in meta["vectors"]}
    expected_keys = set()
    for site in sites:
      if site not in shapes:
        raise LibraryError(f"expert {name!r}: field 'sites': unknown site {site}")
      d, f = shapes[site]
      a, b = tensors.get(f"{site}/lora_a"), tensors.get(f"{site}/lora_b")
      if a is None or b is None:
        raise LibraryError(f"expert {name!r}: field 'arrays': site {site} lacks lora_a/lora_b")
      if a.shape != (d, meta["rank"]) or b.shape != (meta["rank"], f):
        raise LibraryError(f"expert {name!r}: field 'rank'/'arrays': site {site} has lora_a "
                           f"{list(a.shape)}, lora_b {list(b.shape)}; expected [{d}, "
                           f"{meta['rank']}], [{meta['rank']}, {f}]")
      lora[site] = {"lora_a": a, "lora_b": b}
      expected_keys |= {f"{site}/lora_a", f"{site}/lora_b"}
      for kind in meta["vectors"]:
        key = f"{site}/{kind}"
        if key not in tensors:
          raise LibraryError(f"expert {name!r}: field 'vectors': {kind!r} missing at {site}")
        vectors[kind][site] = tensors[key]
        expected_keys.add(key)
    stray = sorted(set(tensors) - expected_keys)
    if stray:
      raise LibraryError(f"expert {name!r}: field 'arrays': unexpected tensors {stray}")
    if self.rank is not None and meta["rank"] != self.rank:
      raise LibraryError(f"expert {name!r}: field 'rank' is {meta['rank']}, the library pins "
                         f"{self.rank}")
    return Expert(name=name, task=meta["task"], rank=int(meta["rank"]),
                  scale=float(meta["scale"]), lora=lora, vectors=vectors, metadata=meta)

  def check(self) -> List[str]:
    """Verifies every entry; returns a list of problems (empty if the library is sound).

    Also reports entry directories not listed in ``library.json`` (left by an interrupted `add`)
    and leftover temporary directories.
    """
    problems = []
    for name in self.names():
      try:
        self.load(name)
      except LibraryError as e:
        problems.append(str(e))
    listed = set(self.names())
    if os.path.isdir(self.experts_dir):
      for entry in sorted(os.listdir(self.experts_dir)):
        if entry.startswith("."):
          problems.append(f"leftover temporary entry {entry} in {self.experts_dir}")
        elif entry not in listed:
          problems.append(f"entry directory {entry} is not listed in {fmt.LIBRARY_FILE}")
    return problems

  # -- stacking ------------------------------------------------------------------------------

  def stack(self, names: Optional[Sequence[str]] = None, vectors: Optional[str] = "gate",
            dtype: Any = None, sites: Optional[Sequence[str]] = None, mesh: Any = None,
            expert_axis: Optional[str] = None) -> Stacked:
    """Stacks experts into the routed-site arrays of the adapters contract.

    Args:
      names: experts in E order (default: all, in library order).
      vectors: the per-site router vectors to put under 'gates' ('gate' for PHATGOOSE,
        'average_activation' / 'arrow' for those baselines), or None to omit 'gates'.
      dtype: cast lora_a, lora_b and gates to this dtype (default: the stored dtypes, promoted);
        'scale' is always float32. The router computes in float32 whatever this dtype, but
        gates cast to bfloat16 here are rounded before it sees them; keep the default for
        routing-exact results.
      sites: subset of sites (default: the library's sites).
      mesh, expert_axis: if ``mesh`` is given, place arrays with `place_stacked`.

    Returns:
      ``{site: {'lora_a': [E, D, R], 'lora_b': [E, R, F], 'gates': [E, D], 'scale': [E]}}`` as
      numpy arrays (jax arrays if ``mesh``). R is the largest rank; smaller ranks are zero-padded
      (exact: the padded products are zero).

    Raises:
      LibraryError: empty selection, unknown names/sites, or an expert lacking ``vectors``.
    """
    self._reload()
    names = self.names() if names is None else list(names)
    if not names:
      raise LibraryError(f"stack: no experts to stack (library {self.path} has "
                         f"{len(self)} experts, names={names})")
    if len(set(names)) != len(names):
      raise LibraryError(f"stack: names contain duplicates: {names}")
    for n in names:
      self._require(n)
    if vectors is not None:
      fmt.validate_kind(vectors)
    experts = [self.load(n) for n in names]
    lib_sites = self.sites or experts[0].metadata["sites"]
    sites = list(lib_sites) if sites is None else list(sites)
    for site in sites:
      if site not in lib_sites:
        raise LibraryError(f"stack: site {site!r} is not a site of the library")
    if vectors is not None:
      lacking = [e.name for e in experts if vectors not in e.vectors]
      if lacking:
        how = {"gate": "add each expert from its gate run's MODEL_DIR (runs/train_gate.gin), "
                       "not from the expert run",
               "arrow": f"run `phatgoose-jax library vectors {self.path} arrow`",
               "average_activation": f"run `phatgoose-jax library vectors {self.path} "
                                     "average_activation` (gin/runs/average_activation.gin)"
               }.get(vectors, f"store them with ExpertLibrary.set_vectors(name, {vectors!r}, ...)")
        raise LibraryError(f"stack: expert(s) {lacking} have no {vectors!r} vectors; {how}")
    r_max = max(e.rank for e in experts)
    out: Stacked = {}
    for site in sites:
      a_list, b_list = [], []
      for e in experts:
        a, b = e.lora[site]["lora_a"], e.lora[site]["lora_b"]
        pad = r_max - e.rank
        a_list.append(np.pad(a, ((0, 0), (0, pad))))  # [D, R_max], zero columns
        b_list.append(np.pad(b, ((0, pad), (0, 0))))  # [R_max, F], zero rows
      entry = {"lora_a": np.stack(a_list), "lora_b": np.stack(b_list)}
      if vectors is not None:
        entry["gates"] = np.stack([e.vectors[vectors][site] for e in experts])  # [E, D]
      if dtype is not None:
        entry = {k: v.astype(dtype) for k, v in entry.items()}
      entry["scale"] = np.asarray([e.scale for e in experts], np.float32)  # [E]
      out[site] = entry
    if mesh is not None:
      return place_stacked(out, mesh, expert_axis)
    return out
