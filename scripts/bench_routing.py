"""Cost of PHATGOOSE routing over the base T5 computation, measured in one run.

Letters: B batch, L encoder length, T tokens, D site input, F site output, E experts, K top-k,
R LoRA rank.

Per site the flop floor over the base ``2*T*D*F`` is ``2*T*K*R*(D+F)`` (LoRA) plus ``2*T*E*D``
(router), i.e. ``floor = 1 + K*R*(D+F)/(D*F) + E/F``. Parts (``--parts``):

  site      one site at T5-base dims, every backend, ratio routed/base next to the floor; plus
            the T5 encoder-layer mix (4x 768->768, 2x 768->2048, 1x 2048->768) and q/k/v with
            one fused router matmul (`routing.fused`) vs three. The backends include
            ``cpu_kernel`` (the native XLA:CPU custom call) on CPU when it builds; ``auto`` is
            what ``routed_lora(backend='auto')`` runs (``rt.auto_backend``); run with
            ``PHATGOOSE_JAX_CPU_KERNEL=0`` for the pure-JAX choices;
  forward   whole T5-base forward (12+12 layers, batch 4, encoder 256 / decoder 32,
            teacher-forced, float32), base vs routed (E=36, 166);
  decode    one cached greedy decoding step (batch 8, encoder 256, 16 tokens cached, the
            cross-attention keys/values cached as `decoding.init_cache` does; a zero cache at
            position 16 and the base encoder output serve every model: the step's cost does not
            depend on their values);
  official  the official code's scheme in JAX (library re-stacked every call, a ``fori_loop``
            over all experts, each applied to every token under its routing mask) vs ours;
            ratio is reference/ours; whole model at E=36 only in ``--quick`` (its cost grows
            with E: ~10 s per call at E=166), one site at E=36 and 166. The whole-model
            official-style program is timed in its own interleaved loop with the base (its
            per-call re-stacking slowed the programs next to it), and official/ours is
            (official/base) / (ours/base), each over its own loop's base;
  train     expert LoRA training step (tokens/s) vs a full-model step;
  scaling   library bytes per device on 1 vs 8 emulated devices (subprocess with
            XLA_FLAGS=--xla_force_host_platform_device_count=8); routed time (auto) for
            E = 10 .. 1000 and its growth, next to the growth of base + router alone.

Base parameters are random N(0, 0.05^2) drawn by numpy once per run; whole-model programs are
compiled two at a time (`compile_all`) before timing.
Timing: jit-compiled, one warm-up call, then the minimum (``--stat min``, default) or the median
of ``--repeats`` calls with
``block_until_ready``. Base and routed of one ratio are timed back to back, interleaved: in the
site part each backend in its own loop with the base, in the forward part ours (base, E=36,
E=166) in one loop and the official-style program in another, in the scaling part every E in
one loop.
Records (``--json``): {"benchmark", "backend", "experts", "tokens", "dims": [D, F], "ratio", ...}.

Allocator (``--malloc``): ``heap`` (default) calls `phatgoose_jax.cpu_malloc.keep_buffers_on_heap`
before anything is allocated, so XLA:CPU's > 32 MB buffers are reused instead of mmap-ed and
page-faulted on every call (both base and routed programs run under it; the JSON's env file
records the mode); ``system`` keeps glibc's defaults.

Library (``--library``, whole-model parts): ``per-site`` (default) gives every site its own
random experts (4.5 GB at E=166), as a real library does, so no site finds its experts in the
CPU caches; ``shared`` (the default before 2026-11-26 13:50) draws one library per site shape
and reuses it at every site of that shape (3 libraries in memory).

Usage: python scripts/bench_routing.py [--quick | --smoke] [--json PATH] [--parts a,b]
                                       [--malloc heap|system] [--stat min|median]
                                       [--library shared|per-site]
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from phatgoose_jax import adapters as ad  # noqa: E402
from phatgoose_jax import cpu_malloc  # noqa: E402
from phatgoose_jax import routing as rt  # noqa: E402
from phatgoose_jax.models import T5Config  # noqa: E402
from phatgoose_jax.routing import cpu_kernel  # noqa: E402
from phatgoose_jax.routing import fused  # noqa: E402

PARTS = ("site", "forward", "decode", "official", "train", "scaling")
SITE_BACKENDS = ("dense", "gather", "sorted", "chunked_gather", "cpu_kernel")
K, R = 2, 16


@dataclasses.dataclass
class Settings:
  """Sizes of one run (``--quick`` / ``--smoke`` / full)."""
  repeats: int
  site_dims: tuple  # ((D, F), ...)
  site_tokens: tuple
  site_experts: tuple
  model: T5Config
  batch: int
  enc_len: int
  dec_len: int
  model_experts: tuple
  decode_batch: int
  decode_cached: int
  train_layers: int
  scaling_experts: tuple
  scaling_tokens: int
  sharded_experts: int
  gather_max_bytes: float = 3e8
  official_experts: tuple = ()  # whole-model official-style loop at these E (() = model_experts)
  forward_repeats: int = 0  # whole-forward repeats (0: ``repeats``); its times vary the most


T5_BASE = T5Config(vocab_size=32128, emb_dim=768, num_heads=12, num_encoder_layers=12,
                   num_decoder_layers=12, head_dim=64, mlp_dim=2048, dropout_rate=0.0,
                   dtype="float32", param_dtype="float32")
BASE_DIMS = ((768, 768), (768, 2048), (2048, 768))


def settings(mode: str) -> Settings:
  if mode == "smoke":
    tiny = T5Config(vocab_size=64, emb_dim=24, num_heads=2, num_encoder_layers=1,
                    num_decoder_layers=1, head_dim=8, mlp_dim=40, dropout_rate=0.0,
                    dtype="float32", param_dtype="float32")
    return Settings(1, ((24, 40),), (16,), (5,), tiny, 2, 8, 4, (3,), 2, 2, 1, (3, 6), 16, 8)
  if mode == "quick":
    return Settings(5, BASE_DIMS, (4096,), (36, 166), T5_BASE, 4, 256, 32, (36, 166),
                    8, 16, 2, (10, 100, 1000), 1024, 168, official_experts=(36,),
                    forward_repeats=9)
  return Settings(5, BASE_DIMS, (1024, 4096), (8, 36, 166, 512), T5_BASE, 4, 256, 32, (36, 166),
                  8, 16, 12, (10, 30, 100, 300, 1000), 4096, 168)


# ----------------------------------------------------------------------------- timing

def _time_once(fn: Callable, args) -> float:
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - t0


STAT = {"name": "min"}


def time_pair(fns: dict, args: dict, repeats: int) -> dict:
  """Seconds of each jitted fn, after a warm-up call, calls interleaved round-robin.

  The minimum over the repeats by default (``--stat``): on the shared 2-core machine single
  calls of the same program moved by up to 2x (a 768x768 GEMM at T=4096: 10-16 ms), mostly
  upwards, so the minimum is the stable estimate of each program's own cost; ``median`` is
  kept for comparison with the earlier tables.
  """
  for name, fn in fns.items():
    jax.block_until_ready(fn(*args[name]))
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      times[name].append(_time_once(fn, args[name]))
  reduce = min if STAT["name"] == "min" else statistics.median
  return {name: reduce(v) for name, v in times.items()}


def compile_all(programs: dict) -> dict:
  """{name: (jitted fn, args)} -> {name: compiled executable}, two compilations at a time.

  XLA compiles one program on one thread; the whole-model programs (216 routed sites) take
  tens of seconds each, so compiling them side by side halves the wall time on 2 cores.
  """
  from concurrent.futures import ThreadPoolExecutor  # pylint: disable=g-import-not-at-top
  lowered = {name: fn.lower(*args) for name, (fn, args) in programs.items()}
  with ThreadPoolExecutor(max_workers=2) as pool:
    futures = {name: pool.submit(low.compile) for name, low in lowered.items()}
    return {name: fut.result() for name, fut in futures.items()}


def record(benchmark: str, backend: str, experts: int, tokens: int, dims, ratio: float,
           **extra) -> dict:
  rec = {"benchmark": benchmark, "backend": backend, "experts": int(experts),
         "tokens": int(tokens), "dims": [int(d) for d in dims], "ratio": float(ratio)}
  rec.update(extra)
  print("  " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in rec.items()), flush=True)
  return rec


def floor(d: int, f: int, e: int) -> float:
  return 1.0 + K * R * (d + f) / (d * f) + e / f


# ----------------------------------------------------------------------------- one site

def _site_problem(t, d, f, e, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(t, d)).astype(np.float32))
  w = jnp.asarray(rng.normal(size=(d, f)).astype(np.float32) / np.sqrt(d))
  a = jnp.asarray(rng.normal(size=(e, d, R)).astype(np.float32) * 0.01)
  b = jnp.asarray(rng.normal(size=(e, R, f)).astype(np.float32) * 0.01)
  g = jnp.asarray(rng.normal(size=(e, d)).astype(np.float32))
  s = jnp.full((e,), 1.0 / R, jnp.float32)
  return x, w, a, b, g, s


@jax.jit
def _base(x, w):
  return x @ w


@functools.partial(jax.jit, static_argnames=("backend",))
def _routed(x, w, a, b, g, s, backend):
  routing = rt.phatgoose_route(x, g, K)
  # As RoutedLoraSite: the delta is added to the base output ('cpu_kernel' accumulates in place).
  return rt.routed_lora(x, a, b, routing, s, backend=backend, add_to=x @ w)


@jax.jit
def _official_site(x, w, a, b, g, s):
  return x @ w + official_style_lora(x, a, b, g, s)


def official_style_lora(x, a, b, g, s):
  """The official scheme, in JAX: re-stack the library, then every expert on every token.

  r-three/phatgoose keeps one module per expert and stacks their weights on each forward, then
  loops over all experts in Python. Here the re-stack is one forced copy of the stacked arrays
  (``optimization_barrier`` stops XLA from eliding it) and the loop is a ``fori_loop`` over E
  that applies expert e to all T tokens under its routing mask (JAX needs static shapes; the
  official loop gathers the routed tokens instead, a dynamic shape).
  """
  e = a.shape[0]
  half = e // 2
  parts = jax.lax.optimization_barrier((a[:half], a[half:], b[:half], b[half:], g[:half],
                                        g[half:]))
  a = jnp.concatenate(parts[0:2])  # [E, D, R] re-stacked
  b = jnp.concatenate(parts[2:4])  # [E, R, F]
  g = jnp.concatenate(parts[4:6])  # [E, D]
  routing = rt.phatgoose_route(x, g, K)
  lead = x.shape[:-1]
  x2 = x.reshape(-1, x.shape[-1])
  idx = routing.indices.reshape(-1, K)
  wts = routing.weights.reshape(-1, K)

  def body(i, out):
    mask = jnp.sum(jnp.where(idx == i, wts, 0.0), axis=-1) * s[i]  # [T]
    delta = (x2 @ a[i]) @ b[i]  # [T, F]
    return out + mask[:, None].astype(x.dtype) * delta

  out = jax.lax.fori_loop(0, e, body, jnp.zeros((x2.shape[0], b.shape[-1]), x.dtype))
  return out.reshape(lead + (b.shape[-1],))


def bench_site(cfg: Settings) -> list:
  print("[site] one site, routed (router + LoRA + base) / base", flush=True)
  recs = []
  best = {}
  for t in cfg.site_tokens:
    for (d, f) in cfg.site_dims:
      for e in cfg.site_experts:
        x, w, a, b, g, s = _site_problem(t, d, f, e)
        fns, args = {}, {}
        for be in SITE_BACKENDS:
          if be == "cpu_kernel" and (jax.default_backend() != "cpu" or not cpu_kernel.available()):
            continue  # a CPU-only custom call; without a C++ compiler the JAX paths only
          if be == "gather" and t * K * (d * R + R * f) * 4 > cfg.gather_max_bytes:
            continue  # gathered per-token weights would not fit a sane budget
          fns[be] = functools.partial(_routed, backend=be)
          args[be] = (x, w, a, b, g, s)
        # Each backend in its own interleaved loop with the base: the slow JAX paths allocate
        # and fill buffers of 10-100 MB per call, and in one shared round-robin they slowed the
        # programs after them (the native kernel by 0.05-0.2 of the ratio at 768->2048).
        times, base_times = {}, {}
        for be in fns:
          pair = time_pair({"base": _base, be: fns[be]}, {"base": (x, w), be: args[be]},
                           cfg.repeats)
          times[be], base_times[be] = pair[be], pair["base"]
        chosen = rt.auto_backend(t, d, e, R, K)
        if chosen in times:  # 'auto' runs exactly the chosen backend's program
          times["auto"], base_times["auto"] = times[chosen], base_times[chosen]
        for be in times:
          ratio = times[be] / base_times[be]
          recs.append(record("site", be, e, t, (d, f), ratio, floor=floor(d, f, e),
                             base_seconds=base_times[be], seconds=times[be],
                             **({"chosen": chosen} if be == "auto" else {})))
        best[(t, d, f, e)] = min((times[be], base_times[be]) for be in times)
  # T5 encoder layer mix: 4 attention sites 768->768, 2 wi 768->2048, 1 wo 2048->768.
  weights = {(768, 768): 4, (768, 2048): 2, (2048, 768): 1}
  for t in cfg.site_tokens:
    for e in cfg.site_experts:
      keys = [(t, d, f, e) for (d, f) in weights if (t, d, f, e) in best]
      if len(keys) != len(weights):
        continue
      routed = sum(weights[k[1:3]] * best[k][0] for k in keys)
      base = sum(weights[k[1:3]] * best[k][1] for k in keys)
      fl = (sum(weights[(d, f)] * (d * f + K * R * (d + f) + e * d) for (d, f) in weights)
            / sum(weights[(d, f)] * d * f for (d, f) in weights))
      recs.append(record("site_layer_mix", "best", e, t, (768, 768), routed / base, floor=fl))
  # q/k/v: three routers on one input, separate vs one fused matmul.
  t, d = cfg.site_tokens[-1], cfg.site_dims[0][0]
  e = max(cfg.site_experts)
  x, _, _, _, _, _ = _site_problem(t, d, d, e)
  gates = [jnp.asarray(np.random.default_rng(i).normal(size=(e, d)).astype(np.float32))
           for i in range(3)]
  sep = jax.jit(lambda x, gs: [rt.phatgoose_route(x, g, K).weights for g in gs])
  fus = jax.jit(lambda x, gs: [r.weights for r in fused.fused_phatgoose_route(x, gs, K)])
  times = time_pair({"sep": sep, "fused": fus}, {"sep": (x, gates), "fused": (x, gates)},
                    cfg.repeats)
  recs.append(record("router_fused_qkv", "fused", e, t, (d, d),
                     times["fused"] / times["sep"], note="fused/separate router time"))
  return recs


# ----------------------------------------------------------------------------- whole model

def _shared_library(model_cfg: T5Config, e: int, seed: int = 0, per_site: bool = False
                    ) -> Callable:
  """A function (site shape -> adapter dict): one random library per (D, F) shape, reused at
  every site of that shape (so E=166 at T5-base needs 3 libraries in memory, not 216), or with
  ``per_site`` a new library at every call (every site its own experts, as in a real library:
  4.5 GB at E=166, and no site finds the previous site's experts in the CPU caches)."""
  cache = {}
  counter = [0]

  def draw(rng, d, f):
    return {
        "lora_a": jnp.asarray(rng.standard_normal((e, d, R), dtype=np.float32) * 0.01),
        "lora_b": jnp.asarray(rng.standard_normal((e, R, f), dtype=np.float32) * 0.01),
        "gates": jnp.asarray(rng.standard_normal((e, d), dtype=np.float32)),
        "scale": jnp.full((e,), 1.0 / R, jnp.float32)}

  def make(d, f):
    if per_site:
      counter[0] += 1
      return draw(np.random.default_rng([seed, d, f, counter[0]]), d, f)
    if (d, f) not in cache:
      cache[(d, f)] = draw(np.random.default_rng(seed + d * 7 + f), d, f)
    return cache[(d, f)]
  return make


LIBRARY = {"per_site": True}  # --library per-site (default): every whole-model site its own experts


def routed_variables(model_cfg: T5Config, base_params, e: int, backend: str = "auto"):
  """(model, variables) of a routed model with E experts at every site (library arrays shared
  per site shape, or one library per site under ``--library per-site``)."""
  acfg = ad.AdapterConfig(mode="routed", num_experts=e, top_k=K, rank=R, backend=backend)
  model = ad.build_model(model_cfg, acfg)
  shapes = jax.eval_shape(lambda: ad.init_variables(model, jax.random.PRNGKey(0)))
  make = _shared_library(model_cfg, e, per_site=LIBRARY["per_site"])

  def fill(tree):
    if "lora_a" in tree and not isinstance(tree["lora_a"], dict):
      _, d, _ = tree["lora_a"].shape
      f = tree["lora_b"].shape[-1]
      return make(d, f)
    return {k: fill(v) for k, v in tree.items()}

  return model, {"params": base_params, "adapters": fill(shapes["adapters"])}


class OfficialStyleSite(ad.RoutedLoraSite):
  """RoutedLoraSite computing the delta with `official_style_lora` (reference to beat)."""

  @nn.compact
  def __call__(self, x, **site_inputs):
    y = self.base_projection(x)
    lora_a, lora_b, gates, scale = self.library(x.shape[-1])
    return y + official_style_lora(x, lora_a, lora_b, gates, scale).astype(self.dtype)


@dataclasses.dataclass(frozen=True)
class OfficialFactory:
  """Site factory: `OfficialStyleSite` wherever ``config`` (mode 'routed') puts a routed site."""
  config: ad.AdapterConfig

  def __call__(self, spec, name):
    cfg = self.config
    if not cfg.matches(spec.site):
      return ad.AdapterSiteFactory(ad.AdapterConfig(mode="none"))(spec, name)
    return OfficialStyleSite(features=spec.features, kernel_axes=spec.kernel_axes, site=spec.site,
                             dtype=spec.dtype, param_dtype=spec.param_dtype,
                             kernel_init=spec.kernel_init, name=name, rank=cfg.rank,
                             num_experts=cfg.num_experts, top_k=cfg.top_k)


def _tokens(cfg: Settings, batch: int, length: int, seed: int):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.integers(2, cfg.model.vocab_size, size=(batch, length)).astype(np.int32))


def _forward_fn(model):
  @jax.jit
  def fwd(variables, enc, dec_in, dec_tgt):
    return model.apply(variables, enc, dec_in, dec_tgt, enable_dropout=False)
  return fwd


_BASE_CACHE = {}


def _base_model(cfg: Settings):
  """(base model, params): shapes from ``init_variables``, values N(0, 0.05^2) from numpy
  (much faster than threefry for T5-base's 250M parameters; timing does not depend on values).
  Built once per run and shared by every part."""
  key = id(cfg.model)
  if key not in _BASE_CACHE:
    model = ad.build_model(cfg.model, ad.AdapterConfig(mode="none"))
    shapes = jax.eval_shape(lambda: ad.init_variables(model, jax.random.PRNGKey(0))["params"])
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.standard_normal(s.shape, dtype=np.float32) * 0.05), shapes)
    _BASE_CACHE[key] = (model, params)
  return _BASE_CACHE[key]


def bench_forward(cfg: Settings, official: bool, ours: bool = True) -> list:
  label = "[forward]" if ours else "[official]"
  print(f"{label} whole model, teacher-forced, B={cfg.batch} L={cfg.enc_len} T={cfg.dec_len}",
        flush=True)
  recs = []
  base_model, params = _base_model(cfg)
  enc = _tokens(cfg, cfg.batch, cfg.enc_len, 1)
  dec = _tokens(cfg, cfg.batch, cfg.dec_len, 2)
  base_fwd = _forward_fn(base_model)
  tokens = cfg.batch * (cfg.enc_len + cfg.dec_len)
  dims = (cfg.model.emb_dim, cfg.model.mlp_dim)
  programs = {"base": (base_fwd, ({"params": params}, enc, dec, dec))}
  official_experts = cfg.official_experts or cfg.model_experts
  for e in cfg.model_experts:
    model, variables = routed_variables(cfg.model, params, e)
    if ours:
      programs[f"routed{e}"] = (_forward_fn(model), (variables, enc, dec, dec))
    if official and e in official_experts:
      off_model = model.clone(site_factory=OfficialFactory(model.site_factory.config))
      programs[f"official{e}"] = (_forward_fn(off_model), (variables, enc, dec, dec))
  t0 = time.perf_counter()
  compiled = compile_all(programs)
  print(f"  compiled {len(programs)} programs in {time.perf_counter() - t0:.1f}s", flush=True)
  # Ours (base + routed E=36, 166) in one interleaved loop; the official-style programs in a
  # second interleaved loop with the base again. The official-style program allocates and fills
  # a re-stacked library copy on every call (GBs); run in the same round-robin it slowed the
  # programs after it by 0.1-0.2 of the E=166 ratio (session-3 runs), so each loop's ratios use
  # that loop's own base time, and official/ours is the ratio of the two ratios to base.
  args = {n: p[1] for n, p in programs.items()}
  ours_names = [n for n in compiled if not n.startswith("official")]
  official_names = [n for n in compiled if n.startswith("official")]
  repeats = cfg.forward_repeats or cfg.repeats
  times = time_pair({n: compiled[n] for n in ours_names}, args, repeats)
  official_times = {}
  if official_names:
    official_times = time_pair({n: compiled[n] for n in ["base"] + official_names}, args,
                               max(3, repeats // 2))
  for e in cfg.model_experts:
    if ours:
      recs.append(record("forward", "auto", e, tokens, dims, times[f"routed{e}"] / times["base"],
                         base_seconds=times["base"], seconds=times[f"routed{e}"]))
    if f"official{e}" in official_times:
      official_ratio = official_times[f"official{e}"] / official_times["base"]
      recs.append(record("forward_official_style", "official", e, tokens, dims, official_ratio,
                         seconds=official_times[f"official{e}"],
                         base_seconds=official_times["base"]))
      if ours:
        recs.append(record("official_vs_ours", "auto", e, tokens, dims,
                           official_ratio / (times[f"routed{e}"] / times["base"]),
                           note="ratio = reference/ours, each over its own loop's base time"))
  return recs


def bench_official_site(cfg: Settings) -> list:
  print("[official] one site: official-style / ours (auto)", flush=True)
  recs = []
  t = cfg.site_tokens[-1]
  for (d, f) in cfg.site_dims[:1]:
    for e in cfg.model_experts:
      x, w, a, b, g, s = _site_problem(t, d, f, e)
      fns = {"ours": functools.partial(_routed, backend="auto"), "official": _official_site}
      args = {k: (x, w, a, b, g, s) for k in fns}
      times = time_pair(fns, args, cfg.repeats)
      recs.append(record("site_official_vs_ours", "auto", e, t, (d, f),
                         times["official"] / times["ours"], note="ratio = reference/ours"))
  return recs


def bench_decode(cfg: Settings) -> list:
  print(f"[decode] one greedy step, B={cfg.decode_batch} L={cfg.enc_len}, "
        f"{cfg.decode_cached} cached", flush=True)
  recs = []
  base_model, params = _base_model(cfg)
  enc = _tokens(cfg, cfg.decode_batch, cfg.enc_len, 3)
  max_len = cfg.decode_cached + 8
  # The encoder output and the cache contents do not change the step's cost: one base encoding
  # and a zero cache at position ``decode_cached`` serve every model (no per-model encoder or
  # cache-filling compilation).
  encoded = jax.jit(lambda v, t: base_model.apply(v, t, enable_dropout=False,
                                                  method=base_model.encode))({"params": params}, enc)
  dummy = jnp.zeros((cfg.decode_batch, max_len), jnp.int32)
  prev = jnp.zeros((cfg.decode_batch,), jnp.int32)

  def program(model, variables):
    # The cache greedy decoding builds (`decoding.init_cache`): self-attention keys/values and
    # the cross-attention keys/values of the encoder tokens, so a step projects (and routes)
    # only the new token, as in real decoding.
    cache_shapes = jax.eval_shape(
        lambda v: model.apply(v, encoded, enc, dummy, dummy, enable_dropout=False, decode=True,
                              max_decode_length=max_len, mutable=["cache"],
                              cache_cross_attention=True, method=model.decode)[1]["cache"],
        variables)
    cache = jax.tree_util.tree_map_with_path(
        lambda path, s: (jnp.full(s.shape, cfg.decode_cached, s.dtype)
                         if "cache_index" in jax.tree_util.keystr(path) else
                         jnp.zeros(s.shape, s.dtype)), cache_shapes)

    @jax.jit
    def step(v, cache, encoded, prev):
      logits, state = model.apply({**v, "cache": cache}, encoded, enc, prev[:, None],
                                  prev[:, None], enable_dropout=False, decode=True,
                                  max_decode_length=max_len, mutable=["cache"],
                                  method=model.decode)
      return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), state["cache"]

    return step, (variables, cache, encoded, prev)

  programs = {"base": program(base_model, {"params": params})}
  for e in cfg.model_experts:
    model, variables = routed_variables(cfg.model, params, e)
    programs[f"routed{e}"] = program(model, variables)
  compiled = compile_all(programs)
  for e in cfg.model_experts:
    names = ["base", f"routed{e}"]
    times = time_pair({n: compiled[n] for n in names}, {n: programs[n][1] for n in names},
                      cfg.repeats * 3)
    recs.append(record("decode_step", "auto", e, cfg.decode_batch,
                       (cfg.model.emb_dim, cfg.model.mlp_dim),
                       times[f"routed{e}"] / times["base"],
                       base_seconds=times["base"], seconds=times[f"routed{e}"],
                       chosen=rt.auto_backend(cfg.decode_batch, cfg.model.emb_dim, e, R, K)))
  return recs


def bench_train(cfg: Settings) -> list:
  import optax  # pylint: disable=g-import-not-at-top
  layers = cfg.train_layers
  mcfg = cfg.model.replace(num_encoder_layers=layers, num_decoder_layers=layers)
  print(f"[train] expert LoRA step vs full-model step ({layers}+{layers} layers)", flush=True)
  enc = _tokens(cfg, cfg.batch, cfg.enc_len, 4)
  dec = _tokens(cfg, cfg.batch, cfg.dec_len, 5)
  tokens = cfg.batch * (cfg.enc_len + cfg.dec_len)
  lora_model = ad.build_model(mcfg, ad.AdapterConfig(mode="lora", rank=R))
  variables = jax.jit(lambda k: ad.init_variables(lora_model, k))(jax.random.PRNGKey(0))
  params, adapters = variables["params"], variables["adapters"]
  tx = optax.adamw(1e-3)

  def loss_fn(model, params, adapters):
    v = {"params": params}
    if adapters is not None:
      v["adapters"] = adapters
    logits = model.apply(v, enc, dec, dec, enable_dropout=False)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, dec))

  @jax.jit
  def lora_step(params, adapters, opt):
    loss, g = jax.value_and_grad(lambda a: loss_fn(lora_model, params, a))(adapters)
    upd, opt = tx.update(g, opt, adapters)
    return optax.apply_updates(adapters, upd), opt, loss

  base_model = ad.build_model(mcfg, ad.AdapterConfig(mode="none"))

  @jax.jit
  def full_step(params, opt):
    loss, g = jax.value_and_grad(lambda p: loss_fn(base_model, p, None))(params)
    upd, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, upd), opt, loss

  programs = {"lora": (lora_step, (params, adapters, tx.init(adapters))),
              "full": (full_step, (params, tx.init(params)))}
  compiled = compile_all(programs)
  times = time_pair(compiled, {n: p[1] for n, p in programs.items()}, cfg.repeats)
  dims = (mcfg.emb_dim, mcfg.mlp_dim)
  return [record("train_step", "lora", 1, tokens, dims, times["lora"] / times["full"],
                 tokens_per_s=tokens / times["lora"], full_tokens_per_s=tokens / times["full"],
                 layers=layers, note="ratio = expert LoRA step / full-model step")]


# ----------------------------------------------------------------------------- scaling

def library_bytes(e: int, model_cfg: T5Config) -> dict:
  """Per-device bytes of one encoder layer's routed library on all local devices (E sharded
  over the 'data' mesh axis by the project's rules)."""
  from phatgoose_jax.training import partitioning as pt  # pylint: disable=g-import-not-at-top
  mcfg = model_cfg.replace(num_encoder_layers=1, num_decoder_layers=1)
  model = ad.build_model(mcfg, ad.AdapterConfig(mode="routed", num_experts=e, rank=R))
  shapes = jax.eval_shape(lambda: ad.init_variables(model, jax.random.PRNGKey(0)))
  mesh = pt.create_mesh(num_partitions=1)
  shardings = pt.shardings_from_axes(pt.logical_spec_tree(shapes["adapters_axes"]),
                                     shapes["adapters"], mesh,
                                     pt.logical_axis_rules())
  arrays = jax.tree_util.tree_map(
      lambda s, sh: jax.device_put(np.zeros(s.shape, s.dtype), sh), shapes["adapters"], shardings)
  per_device = {}
  total = 0
  for arr in jax.tree_util.tree_leaves(arrays):
    total += arr.nbytes
    for shard in arr.addressable_shards:
      per_device[shard.device.id] = per_device.get(shard.device.id, 0) + shard.data.nbytes
  return {"devices": len(jax.devices()), "total": total, "max_per_device": max(per_device.values())}


def bench_scaling(cfg: Settings) -> list:
  print("[scaling] library bytes per device, 1 vs 8 emulated devices; routed time vs E",
        flush=True)
  recs = []
  e = cfg.sharded_experts
  one = library_bytes(e, cfg.model)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  code = ("import json,sys; sys.path.insert(0, %r); import bench_routing as b; "
          "print(json.dumps(b.library_bytes(%d, b.settings(%r).model)))"
          % (os.path.dirname(os.path.abspath(__file__)), e, cfg_mode))
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       check=True)
  eight = json.loads(out.stdout.strip().splitlines()[-1])
  ratio = eight["max_per_device"] / one["max_per_device"]
  recs.append(record("library_bytes_8_vs_1", "sharded", e, 0,
                     (cfg.model.emb_dim, cfg.model.mlp_dim), ratio,
                     bytes_1=one["max_per_device"], bytes_8=eight["max_per_device"],
                     devices=eight["devices"], target=0.125))
  t = cfg.scaling_tokens
  d = f = cfg.site_dims[0][0]
  # Every E in one interleaved loop (each call takes milliseconds, so 3x the repeats): a burst
  # of machine noise then lands on all of them instead of on one E's minimum.
  fns, args = {"base": _base}, {}
  for e in cfg.scaling_experts:
    x, w, a, b, g, s = _site_problem(t, d, f, e)
    args["base"] = (x, w)
    fns[f"routed{e}"] = functools.partial(_routed, backend="auto")
    args[f"routed{e}"] = (x, w, a, b, g, s)
    fns[f"router{e}"] = _base_and_router
    args[f"router{e}"] = (x, w, g)
  tm = time_pair(fns, args, 3 * cfg.repeats)
  times = {e: tm[f"routed{e}"] for e in cfg.scaling_experts}
  router_times = {e: tm[f"router{e}"] for e in cfg.scaling_experts}
  for e in cfg.scaling_experts:
    recs.append(record("scaling_experts", "auto", e, t, (d, f), times[e] / tm["base"],
                       floor=floor(d, f, e), seconds=times[e], base_seconds=tm["base"],
                       router_seconds=router_times[e], chosen=rt.auto_backend(t, d, e, R, K)))
  lo, hi = min(times), max(times)
  recs.append(record("scaling_growth", "auto", hi, t, (d, f), times[hi] / times[lo],
                     from_experts=lo, note=f"time(E={hi}) / time(E={lo})"))
  # The same growth for base + router only (no LoRA): the part no LoRA backend can remove.
  recs.append(record("scaling_growth_router", "router", hi, t, (d, f),
                     router_times[hi] / times[lo], from_experts=lo,
                     note=f"(base + router)(E={hi}) / routed time(E={lo})"))
  return recs


@jax.jit
def _base_and_router(x, w, g):
  routing = rt.phatgoose_route(x, g, K)
  return x @ w, routing.indices, routing.weights


# ----------------------------------------------------------------------------- main

cfg_mode = "full"


def environment() -> dict:
  import flax  # pylint: disable=g-import-not-at-top
  return {"date": datetime.datetime.now().isoformat(timespec="seconds"),
          "machine": platform.platform(), "processor": platform.processor() or platform.machine(),
          "cpus": os.cpu_count(), "python": platform.python_version(), "jax": jax.__version__,
          "jaxlib": getattr(jax.lib, "__version__", None) or jax.__version__,
          "flax": flax.__version__, "backend": jax.default_backend(),
          "devices": [str(d) for d in jax.devices()], "malloc": cpu_malloc.mode(),
          "cpu_kernel": cpu_kernel.describe() if jax.default_backend() == "cpu" else None}


def main(argv=None) -> list:
  global cfg_mode
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  mode = p.add_mutually_exclusive_group()
  mode.add_argument("--quick", action="store_true", help="the < 5 min (2 CPU cores) selection")
  mode.add_argument("--smoke", action="store_true", help="tiny dims, 1 repeat (tests)")
  p.add_argument("--json", help="write every record to this JSON file")
  p.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {PARTS}")
  p.add_argument("--repeats", type=int, default=None)
  p.add_argument("--malloc", choices=cpu_malloc.MODES, default="heap",
                 help="heap: keep XLA:CPU buffers on the malloc heap (phatgoose_jax.cpu_malloc)")
  p.add_argument("--stat", choices=("min", "median"), default="min",
                 help="statistic of the repeated timings (default min)")
  p.add_argument("--library", choices=("shared", "per-site"), default="per-site",
                 help="whole-model parts: one random library per site (default; 4.5 GB at "
                      "E=166, as a real library) or one per site shape, reused at every site")
  args = p.parse_args(argv)
  cpu_malloc.configure(args.malloc)
  STAT["name"] = args.stat
  LIBRARY["per_site"] = args.library == "per-site"
  cfg_mode = "smoke" if args.smoke else "quick" if args.quick else "full"
  cfg = settings(cfg_mode)
  if args.repeats is not None:
    if args.repeats < 1:
      p.error("--repeats must be >= 1")
    cfg.repeats = args.repeats
    cfg.forward_repeats = 0  # --repeats sets every part
  parts = [x for x in args.parts.split(",") if x]
  bad = sorted(set(parts) - set(PARTS))
  if bad:
    p.error(f"--parts: unknown {bad}; choose from {PARTS}")
  env = environment()
  print(f"bench_routing mode={cfg_mode} {json.dumps(env)}", flush=True)
  t0 = time.perf_counter()
  recs = []
  if "site" in parts:
    recs += bench_site(cfg)
  if "forward" in parts or "official" in parts:
    recs += bench_forward(cfg, official="official" in parts, ours="forward" in parts)
  if "official" in parts:
    recs += bench_official_site(cfg)
  if "decode" in parts:
    recs += bench_decode(cfg)
  if "train" in parts:
    recs += bench_train(cfg)
  if "scaling" in parts:
    recs += bench_scaling(cfg)
  elapsed = time.perf_counter() - t0
  for r in recs:
    r.setdefault("mode", cfg_mode)
  print(f"done in {elapsed:.1f}s, {len(recs)} records", flush=True)
  if args.json:
    with open(args.json, "w") as fh:
      json.dump(recs, fh, indent=1)
    with open(args.json + ".env.json", "w") as fh:
      json.dump(dict(env, mode=cfg_mode, seconds=elapsed, stat=STAT["name"],
                     repeats=cfg.repeats, library=args.library), fh, indent=1)
  return recs


if __name__ == "__main__":
  main()
