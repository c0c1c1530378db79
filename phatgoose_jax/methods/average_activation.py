"""Average Activation prototypes: the mean site input over an expert's training data.

Letters: B batch, L encoder length, T decoder length, D site input width, E experts.

The Average Activation baseline of PHATGOOSE (Muqeeth et al., ICML 2024, sec. 5.1) replaces each
expert's trained gate by the average of the activations that enter the site on the expert's own
training data, and routes exactly as PHATGOOSE (router ``'average_activation'`` =
`routing.phatgoose_route` with these vectors). How the official code (r-three/phatgoose) computes
them, and what we do:

  * Data: 1000 training (example, template) pairs of the expert's dataset drawn at random (its
    averaged-hiddens bash script binds ``max_examples_per_dataset=1000``, which
    ``P3Dataset.truncate_dataset`` samples, and the ``SaveAveragedHiddens`` processor). Here
    `build_library_vectors` draws a seeded uniform sample of the task's training rows
    (`sample_rows`); `site_input_means` itself uses the first ``max_examples`` rows it is given.
  * Model state: the expert's own checkpoint (``exp_out/{EXP_NAME}``) in the single-expert routed
    architecture ``moe_lora_rank16_a2.gin`` without an input gate: the softmax over ONE expert is 1,
    so the expert's LoRA is active at weight 1 at every site while the activations are collected
    ("with the expert active"). Here: the base model plus the expert as a plain LoRA (adapter mode
    'lora', the expert's rank and scale) at every library site, with ``collect_inputs=True``.
  * Per example: ``sum_t w_t u_t`` with ``w = mask / (sum(mask) + 1e-6)``
    (``FFNExperts(replace_with_weighted_hiddens=True)``), the mask being the encoder padding mask at
    sites that see encoder tokens (encoder sites, cross-attention key/value); see
    `phatgoose_jax.adapters.collect`. Then the plain mean over examples (``SaveAveragedHiddens``
    sums the [B, D] rows and divides by their count).
  * Decoder sites (deviation, documented): the official run uses the generation interface, so its
    decoder-site statistic is whatever the last greedy-decoding step left in the hidden-state dict
    (the input of the final generated token). We instead teacher-force the target and average the
    decoder-site inputs over the real target tokens (``decoder_loss_weights`` mask); set
    ``decoder_mask=False`` for the official unmasked mean over all decoder positions.

Vectors are stored in the library as kind ``'average_activation'``
(`ExpertLibrary.set_vectors`); ``ExpertLibrary.stack(vectors='average_activation')`` puts them under
``gates`` of the routed sites.
"""
from __future__ import annotations

import functools

import dataclasses
import re
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Union

import gin
import jax
import jax.numpy as jnp
import numpy as np

from phatgoose_jax import adapters as ad
from phatgoose_jax.library import Expert, ExpertLibrary, LibraryError, to_adapters_tree
from phatgoose_jax.models.config import T5Config

AVERAGE_ACTIVATION_KIND = "average_activation"
MAX_EXAMPLES = 1000
_BATCH_KEYS = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens")


class AverageActivationError(ValueError):
  """Bad inputs to the Average Activation prototype computation."""


@gin.configurable(module="phatgoose_jax.methods.average_activation")
@dataclasses.dataclass(frozen=True)
class AverageActivationConfig:
  """Attributes:
    max_examples: examples averaged per expert (official: 1000).
    decoder_mask: mask decoder-site means with ``decoder_loss_weights`` (True) or take the plain
      mean over all decoder positions (False, the official unmasked decoder average).
    kind: library vector kind written.
  """
  max_examples: int = MAX_EXAMPLES
  decoder_mask: bool = True
  kind: str = AVERAGE_ACTIVATION_KIND

  def __post_init__(self):
    if (isinstance(self.max_examples, bool) or not isinstance(self.max_examples, int)
        or self.max_examples < 1):
      raise AverageActivationError(f"AverageActivationConfig.max_examples must be a positive int, "
                                   f"got {self.max_examples!r}")


def sites_pattern(sites: Sequence[str]) -> str:
  """A regex that fully matches exactly ``sites``."""
  if not sites:
    raise AverageActivationError("sites_pattern: no sites")
  return "|".join(re.escape(s) for s in sites)


def flatten_site_means(intermediates: Mapping[str, Any]) -> Dict[str, Any]:
  """``intermediates`` (nested) -> ``{site: [B, D]}`` from the sown ``site_input_mean`` leaves."""
  out: Dict[str, Any] = {}

  def visit(node: Mapping[str, Any], path: tuple) -> None:
    for key, value in node.items():
      if key == "site_input_mean":
        out["/".join(path)] = value[0] if isinstance(value, (tuple, list)) else value
      elif isinstance(value, Mapping):
        visit(value, path + (str(key),))

  visit(intermediates, ())
  return out


def collecting_model(t5_config: T5Config, sites: Sequence[str], rank: int,
                     scale: Optional[float]) -> Any:
  """The base model with one LoRA expert at ``sites`` that sows its per-example site-input means."""
  cfg = ad.AdapterConfig(mode="lora", site_pattern=sites_pattern(sites), rank=int(rank),
                         scale=scale, collect_inputs=True)
  return ad.build_model(t5_config, cfg)


def _check_batch(batch: Mapping[str, Any]) -> None:
  missing = [k for k in _BATCH_KEYS if k not in batch]
  if missing:
    raise AverageActivationError(f"batch lacks features {missing} (has {sorted(batch)})")


@functools.partial(jax.jit, static_argnames=("model", "decoder_mask"))
def _site_means_forward(model, decoder_mask, params, adapters, enc, dec_in, dec_tgt, dec_mask):
  """One forward pass sowing per-example site-input means: {site: [B, D]}.

  Module-level and jitted with the (hashable) model static, so collecting for many experts with
  the same model compiles once.
  """
  site_inputs = {"encoder_token_mask": enc > 0}
  if decoder_mask:
    site_inputs["decoder_token_mask"] = dec_mask
  _, state = model.apply({"params": params, "adapters": adapters}, enc, dec_in, dec_tgt,
                         enable_dropout=False, site_inputs=site_inputs,
                         mutable=["intermediates"])
  return flatten_site_means(state["intermediates"])


def site_input_means(model: Any, params: Any, adapters: Any,
                     batches: Iterable[Mapping[str, np.ndarray]], max_examples: int = MAX_EXAMPLES,
                     decoder_mask: bool = True) -> Dict[str, np.ndarray]:
  """Mean over examples of the per-example masked site-input means.

  Args:
    model: a `Transformer` whose sites sow ``site_input_mean`` (``collect_inputs=True``).
    params: base parameters.
    adapters: the ``adapters`` collection of ``model``.
    batches: feature dicts (``encoder_input_tokens`` [B, L], ``decoder_input_tokens`` /
      ``decoder_target_tokens`` [B, T], optional ``decoder_loss_weights``), e.g. from
      `phatgoose_jax.data.pipeline.iterate_numpy_batches`. The first batch fixes the shapes; a
      smaller last batch is zero-padded (no recompilation) and its padding rows dropped.
    max_examples: examples used at most (the first ones).
    decoder_mask: see `AverageActivationConfig`.

  Returns:
    ``{site: [D]}`` float32 means over the examples used.
  """

  sums: Dict[str, np.ndarray] = {}
  count = 0
  shape = None
  for batch in batches:
    if count >= max_examples:
      break
    _check_batch(batch)
    enc = np.asarray(batch["encoder_input_tokens"], np.int32)
    dec_in = np.asarray(batch["decoder_input_tokens"], np.int32)
    dec_tgt = np.asarray(batch["decoder_target_tokens"], np.int32)
    weights = batch.get("decoder_loss_weights")
    dec_mask = np.asarray(dec_tgt > 0 if weights is None else weights, np.float32)
    n = enc.shape[0]
    if shape is None:
      shape = (enc.shape, dec_in.shape)
    if enc.shape[1:] != shape[0][1:] or dec_in.shape[1:] != shape[1][1:] or n > shape[0][0]:
      raise AverageActivationError(f"batches must share shapes: first {shape}, got "
                                   f"{enc.shape}, {dec_in.shape}")
    pad = shape[0][0] - n
    if pad:
      enc, dec_in, dec_tgt, dec_mask = (np.pad(x, ((0, pad), (0, 0)))
                                        for x in (enc, dec_in, dec_tgt, dec_mask))
    keep = min(n, max_examples - count)
    means = _site_means_forward(model, decoder_mask, params, adapters, enc, dec_in, dec_tgt,
                                dec_mask)
    if not means:
      raise AverageActivationError("the model sowed no site_input_mean (collect_inputs off?)")
    for site, m in means.items():
      rows = np.asarray(m, np.float64)[:keep]  # [keep, D]
      sums[site] = sums.get(site, 0.0) + rows.sum(axis=0)
    count += keep
  if count == 0:
    raise AverageActivationError("site_input_means: no examples in batches")
  return {site: (s / count).astype(np.float32) for site, s in sums.items()}


def expert_average_activation(t5_config: T5Config, params: Any, expert: Expert,
                              batches: Iterable[Mapping[str, np.ndarray]],
                              config: AverageActivationConfig = AverageActivationConfig()
                              ) -> Dict[str, np.ndarray]:
  """Average Activation prototypes ``{site: [D]}`` of one expert, collected with it active."""
  sites = list(expert.lora)
  model = collecting_model(t5_config, sites, expert.rank, expert.scale)
  adapters = to_adapters_tree({s: {k: jnp.asarray(v) for k, v in ab.items()}
                               for s, ab in expert.lora.items()})
  means = site_input_means(model, params, adapters, batches, config.max_examples,
                           config.decoder_mask)
  missing = sorted(set(sites) - set(means))
  if missing:
    raise AverageActivationError(f"expert {expert.name!r}: no activations collected at {missing}")
  return {s: means[s] for s in sites}


BatchesFor = Union[Mapping[str, Iterable[Mapping[str, np.ndarray]]],
                   Callable[[str], Iterable[Mapping[str, np.ndarray]]]]


def compute_average_activation_vectors(library: ExpertLibrary, params: Any,
                                       batches_for: BatchesFor,
                                       names: Optional[Sequence[str]] = None,
                                       config: AverageActivationConfig = AverageActivationConfig()
                                       ) -> Dict[str, Dict[str, np.ndarray]]:
  """Computes and stores (kind ``config.kind``) the prototypes of library experts.

  Args:
    library: the expert library; its T5 config builds the model.
    params: base model parameters (the library's base model).
    batches_for: expert name -> batches of that expert's training data (a mapping or a callable).
    names: experts to process (default: all).
    config: `AverageActivationConfig`.

  Returns:
    ``{name: {site: [D]}}``.
  """
  names = library.names() if names is None else list(names)
  done = {}
  for name in names:
    if callable(batches_for):
      batches = batches_for(name)
    elif name in batches_for:
      batches = batches_for[name]
    else:
      raise LibraryError(f"compute_average_activation_vectors: no training batches for expert "
                         f"{name!r}")
    expert = library.load(name)
    vectors = expert_average_activation(library.t5_config, params, expert, batches, config)
    library.set_vectors(name, config.kind, vectors, provenance={
        "method": "average_activation", "max_examples": config.max_examples,
        "decoder_mask": config.decoder_mask, "reference": "Muqeeth et al. 2024, sec. 5.1"})
    done[name] = vectors
  return done


def sample_rows(batches: Iterable[Mapping[str, np.ndarray]], k: int, seed: int
                ) -> list[dict[str, np.ndarray]]:
  """A uniform sample of ``k`` rows of a stream of batches (all rows, in order, when there are
  fewer): one pass of seeded reservoir sampling (Algorithm R), rows in reservoir-slot order."""
  rng = np.random.default_rng(seed)
  kept: list = []
  seen = 0
  for batch in batches:
    n = len(next(iter(batch.values())))
    for i in range(n):
      if seen < k:
        kept.append({key: np.asarray(v[i]) for key, v in batch.items()})
      else:
        j = int(rng.integers(0, seen + 1))
        if j < k:
          kept[j] = {key: np.asarray(v[i]) for key, v in batch.items()}
      seen += 1
  return kept


def _rebatch(rows: Sequence[Mapping[str, np.ndarray]], batch_size: int):
  for start in range(0, len(rows), batch_size):
    part = rows[start:start + batch_size]
    yield {key: np.stack([r[key] for r in part]) for key in part[0]}


@gin.configurable(module="phatgoose_jax.methods.average_activation")
def build_library_vectors(library_path: str = gin.REQUIRED, checkpoint_path: str = gin.REQUIRED,
                          task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
                          task_module: Optional[Any] = gin.REQUIRED, batch_size: int = 32,
                          experts: Optional[Sequence[str]] = None, overwrite: bool = False,
                          sample_seed: int = 42,
                          config: Optional[AverageActivationConfig] = None
                          ) -> Dict[str, Dict[str, np.ndarray]]:
  """The gin job of `gin/runs/average_activation.gin` (`phatgoose-jax library vectors LIB
  average_activation`): Average Activation prototypes of library experts, each from a seeded
  uniform sample of ``config.max_examples`` rows of the training split of the seqio task
  recorded with the expert (its ``task`` field, the training run's MIXTURE_OR_TASK_NAME), with
  the expert active. The official averaged-hiddens run also draws ``max_examples_per_dataset =
  1000`` (example, template) pairs at random (``P3Dataset.truncate_dataset``, seed 42); the rows
  drawn here differ (a reservoir sample over the seqio stream).

  Args:
    library_path: LIBRARY_PATH.
    checkpoint_path: the base model (CHECKPOINT_PATH); its fingerprint must be the library's.
    task_feature_lengths: TASK_FEATURE_LENGTHS of the batches.
    task_module: MIXTURE_OR_TASK_MODULE (registers the experts' tasks), or None.
    batch_size: rows per forward pass.
    experts: experts to process (default all).
    overwrite: recompute experts that already have the vectors (default: skip them).
    sample_seed: seed of the row sample.
    config: `AverageActivationConfig` (default: the gin-bound one).

  Returns:
    ``{name: {site: [D]}}`` of the experts processed.

  Raises:
    LibraryError: another base model, unknown experts, an expert without a ``task``, a task
      without a 'train' split or with no rows.
  """
  from phatgoose_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from phatgoose_jax.data import pipeline, registry  # pylint: disable=g-import-not-at-top
  config = config or AverageActivationConfig()
  library = ExpertLibrary.open(library_path)
  names = library.names() if not experts else list(experts)
  unknown = sorted(set(names) - set(library.names()))
  if unknown:
    raise LibraryError(f"{library_path}: experts {unknown} are not in the library")
  if not overwrite:
    names = [n for n in names if config.kind not in library.metadata(n).get("vectors", [])]
  if not names:
    return {}
  tasks = {n: library.metadata(n).get("task") for n in names}
  lacking = sorted(n for n, t in tasks.items() if not t)
  if lacking:
    raise LibraryError(f"{library_path}: experts {lacking} record no 'task' (the seqio task of "
                       "their training data); add them from their training runs or with --task")
  registry.import_task_module(task_module)
  for name, task in tasks.items():  # unknown tasks or splits fail before any model work
    provider = registry.get_task_or_mixture(task)
    if "train" not in provider.splits:
      raise LibraryError(f"expert {name!r}: task {task!r} has no 'train' split "
                         f"(splits {list(provider.splits)})")
  _, params = checkpoints.load_checkpoint(checkpoint_path)
  fingerprint = checkpoints.params_fingerprint(params)
  if fingerprint != library.base_fingerprint:
    raise LibraryError(f"library {library_path}: field 'base_fingerprint' is "
                       f"{library.base_fingerprint}, but {checkpoint_path} has {fingerprint}")

  def batches_for(name):
    stream = pipeline.get_dataset(tasks[name], dict(task_feature_lengths), "train", batch_size,
                                  shuffle=False, num_epochs=1, drop_remainder=False)
    rows = sample_rows(stream, config.max_examples, sample_seed)
    if not rows:
      raise LibraryError(f"expert {name!r}: task {tasks[name]!r} has no training rows")
    return _rebatch(rows, batch_size)
  return compute_average_activation_vectors(library, params, batches_for, names, config)


__all__ = [
    "AVERAGE_ACTIVATION_KIND", "AverageActivationConfig", "AverageActivationError",
    "build_library_vectors", "sample_rows",
    "collecting_model", "compute_average_activation_vectors", "expert_average_activation",
    "flatten_site_means", "site_input_means", "sites_pattern",
]
