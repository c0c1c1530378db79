"""AdapterConfig and the site factory that puts adapters on the T5.1.1 network.

Letters: B batch, L encoder length, T decoder length, D site input, F site output, E experts,
R LoRA rank.

`make_site_factory` returns the callable that `phatgoose_jax.models.Transformer` calls for every
dense projection; sites whose name fully matches ``AdapterConfig.site_pattern`` get the adapter of
``AdapterConfig.mode``, the others a plain `DenseSite`. Base parameters never move: every site keeps
its ``kernel`` in ``params`` at the path of the plain model, and adapter variables live in the
``adapters`` collection at the same path (``adapters_axes`` holds their logical axes).

PHATGOOSE (Muqeeth et al., ICML 2024, sec. 4) adapts every linear layer of T5.1.1 (q, k, v, o of all
attentions, wi_0, wi_1, wo of all FFNs, encoder and decoder) with rank-16 LoRA; that is
``DEFAULT_SITE_PATTERN``.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, Optional

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from phatgoose_jax import routing as rt
from phatgoose_jax.adapters.collect import CollectingDenseSite
from phatgoose_jax.adapters.gate import GatedLoraSite
from phatgoose_jax.adapters.lora import LoraSite
from phatgoose_jax.adapters.routed import ROUTERS, TOP_K_ROUTERS, RoutedLoraSite
from phatgoose_jax.models.config import T5Config
from phatgoose_jax.models.layers import SiteSpec, dense_site
from phatgoose_jax.models.transformer import Transformer

DEFAULT_SITE_PATTERN = (r"(encoder|decoder)/layers_\d+/"
                        r"(attention|self_attention|encoder_decoder_attention)/"
                        r"(query|key|value|out)"
                        r"|(encoder|decoder)/layers_\d+/mlp/(wi|wi_\d+|wo)")
MODES = ("none", "lora", "gated_lora", "routed")
TRAINABLE = {"lora": ("lora_a", "lora_b"), "gate": ("gate",)}


@gin.configurable
@dataclasses.dataclass(frozen=True)
class AdapterConfig:
  """What sits at each matched site.

  Attributes:
    mode: 'none' (plain model), 'lora' (one expert), 'gated_lora' (expert + PHATGOOSE gate, for
      gate training) or 'routed' (a library of E experts routed per token).
    site_pattern: regex, ``re.fullmatch``-ed against site names such as
      ``decoder/layers_0/encoder_decoder_attention/key``.
    rank: LoRA rank R (PHATGOOSE: 16).
    scale: LoRA multiplier; None means 1/R (the official code's ``divide_by_d_bottleneck``).
    init_std: std of ``lora_a`` at init (0.01; ``lora_b`` is zero).
    num_experts: E for 'routed' (shapes at init).
    top_k: K for the top-k routers (PHATGOOSE: 2).
    router: see `phatgoose_jax.adapters.routed` (``ROUTERS``).
    backend: `phatgoose_jax.routing.routed_lora` backend.
    arrow_temperature: temperature of the Arrow routers; None (default) picks the variant's
      default, 1.0 for 'arrow' (Ostapenko et al.) and 10.0 for 'arrow_phatgoose' (official code).
    trace: sow each routed site's (indices, weights) into ``intermediates`` as ``routing``.
    collect_inputs: sow each adapted site's per-example input mean into ``intermediates`` as
      ``site_input_mean`` [B, D] (Average Activation prototypes; token masks via ``site_inputs``,
      see `phatgoose_jax.adapters.collect`). With mode 'none' the matched sites are plain
      projections that only collect.
  """
  mode: str = "lora"
  site_pattern: str = DEFAULT_SITE_PATTERN
  rank: int = 16
  scale: Optional[float] = None
  init_std: float = 0.01
  num_experts: int = 1
  top_k: int = 2
  router: str = "phatgoose"
  backend: str = "auto"
  arrow_temperature: Optional[float] = None
  trace: bool = False
  collect_inputs: bool = False

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"AdapterConfig.mode must be one of {MODES}, got {self.mode!r}")
    try:
      re.compile(self.site_pattern)
    except (re.error, TypeError) as e:
      raise ValueError(f"AdapterConfig.site_pattern is not a valid regex: {e}") from None
    for field in ("rank", "num_experts", "top_k"):
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"AdapterConfig.{field} must be a positive int, got {value!r}")
    if (isinstance(self.init_std, bool) or not isinstance(self.init_std, (int, float))
        or not math.isfinite(self.init_std) or self.init_std < 0):
      raise ValueError(f"AdapterConfig.init_std must be a finite number >= 0, got "
                       f"{self.init_std!r}")
    if self.scale is not None and (isinstance(self.scale, bool)
                                   or not isinstance(self.scale, (int, float))
                                   or not math.isfinite(self.scale)):
      raise ValueError(f"AdapterConfig.scale must be a finite number or None, got {self.scale!r}")
    if self.router not in ROUTERS:
      raise ValueError(f"AdapterConfig.router must be one of {ROUTERS}, got {self.router!r}")
    if self.backend not in rt.BACKENDS:
      raise ValueError(f"AdapterConfig.backend must be one of {rt.BACKENDS}, got "
                       f"{self.backend!r}")
    if self.arrow_temperature is not None and not self.arrow_temperature > 0:
      raise ValueError(f"AdapterConfig.arrow_temperature must be > 0 or None, got "
                       f"{self.arrow_temperature!r}")
    if (self.mode == "routed" and self.router in TOP_K_ROUTERS
        and self.top_k > self.num_experts):
      raise ValueError(f"AdapterConfig.top_k={self.top_k} must be <= num_experts="
                       f"{self.num_experts} for router {self.router!r}")

  def matches(self, site: str) -> bool:
    return re.fullmatch(self.site_pattern, site) is not None


@dataclasses.dataclass(frozen=True)
class AdapterSiteFactory:
  """The site factory of an `AdapterConfig` (hashable, so models built from equal configs are
  equal and ``jax.jit(static_argnames='model')`` does not retrace)."""
  config: AdapterConfig

  def __call__(self, spec: SiteSpec, name: str) -> nn.Module:
    cfg = self.config
    if not cfg.matches(spec.site) or (cfg.mode == "none" and not cfg.collect_inputs):
      return dense_site(spec, name)
    common = dict(features=spec.features, kernel_axes=spec.kernel_axes, site=spec.site,
                  dtype=spec.dtype, param_dtype=spec.param_dtype, kernel_init=spec.kernel_init,
                  name=name)
    if cfg.mode == "none":
      return CollectingDenseSite(**common)
    lora = dict(rank=cfg.rank, scale=cfg.scale, init_std=cfg.init_std,
                collect_inputs=cfg.collect_inputs)
    if cfg.mode == "lora":
      return LoraSite(**common, **lora)
    if cfg.mode == "gated_lora":
      return GatedLoraSite(**common, **lora)
    return RoutedLoraSite(**common, **lora, num_experts=cfg.num_experts, top_k=cfg.top_k,
                          router=cfg.router, backend=cfg.backend,
                          arrow_temperature=cfg.arrow_temperature, trace=cfg.trace)


def make_site_factory(cfg: AdapterConfig) -> AdapterSiteFactory:
  """The `SiteFactory` that builds ``cfg``'s adapter at every site matching its pattern."""
  if not isinstance(cfg, AdapterConfig):
    raise ValueError(f"make_site_factory: expected an AdapterConfig, got {type(cfg).__name__}")
  return AdapterSiteFactory(cfg)


def site_names(t5_config: T5Config, pattern: str = DEFAULT_SITE_PATTERN) -> list[str]:
  """Names of the dense sites of ``t5_config``'s network that fully match ``pattern``.

  In network order: per encoder layer attention q, k, v, o then mlp wi_*, wo; per decoder layer
  self_attention, encoder_decoder_attention, mlp.
  """
  try:
    regex = re.compile(pattern)
  except (re.error, TypeError) as e:
    raise ValueError(f"site_names: pattern is not a valid regex: {e}") from None
  acts = t5_config.mlp_activations
  wis = [f"wi_{i}" for i in range(len(acts))] if len(acts) > 1 else ["wi"]
  attn = ["query", "key", "value", "out"]
  mlp = [f"mlp/{w}" for w in wis + ["wo"]]
  names = []
  for i in range(t5_config.num_encoder_layers):
    names += [f"encoder/layers_{i}/attention/{p}" for p in attn]
    names += [f"encoder/layers_{i}/{m}" for m in mlp]
  for i in range(t5_config.num_decoder_layers):
    names += [f"decoder/layers_{i}/self_attention/{p}" for p in attn]
    names += [f"decoder/layers_{i}/encoder_decoder_attention/{p}" for p in attn]
    names += [f"decoder/layers_{i}/{m}" for m in mlp]
  return [n for n in names if regex.fullmatch(n)]


def build_model(t5_config: T5Config, adapter_config: Optional[AdapterConfig] = None) -> Transformer:
  """A `Transformer` whose matched sites carry ``adapter_config``'s adapters."""
  if adapter_config is None:
    adapter_config = AdapterConfig(mode="none")
  return Transformer(t5_config, make_site_factory(adapter_config))


_INIT_COLLECTIONS = ("params", "params_axes", "adapters", "adapters_axes")


def init_variables(model: Transformer, rng: jax.Array, batch_size: int = 1, enc_len: int = 4,
                   dec_len: int = 3, site_inputs: Optional[Mapping[str, Any]] = None) -> dict:
  """Initialises ``model`` on dummy tokens.

  Args:
    model: a `Transformer` (any site factory).
    rng: PRNG key for the ``params`` stream (base kernels and ``lora_a``).
    batch_size, enc_len, dec_len: dummy input shapes (parameter shapes do not depend on them).
    site_inputs: optional extras forwarded to every site at init.

  Returns:
    ``{'params', 'params_axes', 'adapters', 'adapters_axes'}`` (the adapter collections are present,
    possibly empty, for every model); base params equal those of the plain model for the same rng.
  """
  for field, value in (("batch_size", batch_size), ("enc_len", enc_len), ("dec_len", dec_len)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"init_variables: {field} must be a positive int, got {value!r}")
  enc = jnp.ones((batch_size, enc_len), jnp.int32)
  dec = jnp.ones((batch_size, dec_len), jnp.int32)
  variables = model.init({"params": rng}, enc, dec, dec, enable_dropout=False,
                         site_inputs=dict(site_inputs) if site_inputs else None)
  return {k: variables.get(k, {}) for k in _INIT_COLLECTIONS}


def trainable_mask(adapters_tree: Any, what: str) -> Any:
  """A tree of bools with ``adapters_tree``'s structure: True at the leaves trained in a stage.

  Args:
    adapters_tree: the ``adapters`` collection (nested dict / FrozenDict).
    what: 'lora' (expert training: ``lora_a``, ``lora_b``) or 'gate' (PHATGOOSE gate training:
      ``gate``).

  Returns:
    Same structure, bool leaves (usable as an ``optax.masked`` mask).
  """
  if what not in TRAINABLE:
    raise ValueError(f"trainable_mask: what must be one of {sorted(TRAINABLE)}, got {what!r}")
  names = TRAINABLE[what]

  def leaf_name(path) -> str:
    last = path[-1]
    return str(getattr(last, "key", getattr(last, "name", last)))

  return jax.tree_util.tree_map_with_path(lambda p, _: leaf_name(p) in names, adapters_tree)
