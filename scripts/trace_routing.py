"""How skewed the benchmark model's PHATGOOSE routing is, and what each CPU LoRA path costs on it.

Builds the whole-model benchmark of `scripts/bench_routing.py` (random T5-base, one random
library per site shape, E experts), runs one teacher-forced forward with
``AdapterConfig(trace=True)`` and prints, per routed site: tokens T, the largest number of
assignments on one expert (against the mean T*K/E), how many experts are used and the share of
the 8 busiest. With ``--time`` it then times, on the traced routings of the encoder sites of
``--layers``, the LoRA part alone (ms, minimum of ``--repeats``) with: the default `sorted`,
`sorted` with each exact fallback forced (``blocked``, ``chunked_gather``) and the
``chunked_gather`` and ``cpu_kernel`` backends, next to the site's base GEMM.
docs/benchmarks.md ("How skewed the benchmark model's routing is", "Changes in session 2")
quotes these figures.

Usage: python scripts/trace_routing.py [--experts 36 166] [--time] [--layers 0,5,10]
                                       [--malloc heap|system] [--smoke]
                                       [--library shared|per-site]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import bench_routing as br  # noqa: E402
from phatgoose_jax import adapters as ad  # noqa: E402
from phatgoose_jax import cpu_malloc  # noqa: E402
from phatgoose_jax import routing as rt  # noqa: E402


def trace(cfg: br.Settings, experts: int) -> dict:
  """{site path: indices [T, K] int32} of one forward of the benchmark model at E experts."""
  _, params = br._base_model(cfg)  # pylint: disable=protected-access
  model, variables = br.routed_variables(cfg.model, params, experts)
  model = ad.build_model(cfg.model, dataclasses.replace(model.site_factory.config, trace=True))
  enc = br._tokens(cfg, cfg.batch, cfg.enc_len, 1)  # pylint: disable=protected-access
  dec = br._tokens(cfg, cfg.batch, cfg.dec_len, 2)  # pylint: disable=protected-access
  fwd = jax.jit(lambda v, a, b: model.apply(v, a, b, b, enable_dropout=False,
                                            mutable=["intermediates"])[1])
  inter = fwd(variables, enc, dec)["intermediates"]
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(inter)[0]:
    if leaf.dtype != jnp.int32:
      continue  # the routing weights
    keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
    site = "/".join(keys[:keys.index("routing")])
    out[site] = np.asarray(leaf).reshape(-1, leaf.shape[-1])
  return out


def stats(indices: np.ndarray, experts: int) -> dict:
  counts = np.bincount(indices.ravel(), minlength=experts)
  return {"tokens": indices.shape[0], "max_rows": int(counts.max()),
          "mean_rows": float(counts.mean()), "used": int((counts > 0).sum()),
          "top8_share": float(np.sort(counts)[-8:].sum() / counts.sum())}


def site_dims(cfg: br.Settings, site: str) -> tuple:
  d, f = cfg.model.emb_dim, cfg.model.mlp_dim
  if site.endswith(("mlp/wi_0", "mlp/wi_1")):
    return d, f
  if site.endswith("mlp/wo"):
    return f, d
  inner = cfg.model.num_heads * cfg.model.head_dim
  return (inner, d) if site.endswith("/out") else (d, inner)


def time_site(indices: np.ndarray, dims: tuple, experts: int, repeats: int) -> dict:
  """ms of the base GEMM and of the LoRA part with each CPU path, on these routing indices."""
  d, f = dims
  # The one-site problem of bench_routing (same random x, base kernel and LoRA factors).
  x, w, a, b, _, _ = br._site_problem(indices.shape[0], d, f, experts)  # noqa: SLF001
  routing = rt.Routing(jnp.asarray(indices), jnp.full(indices.shape, 0.5, jnp.float32))
  variants = {"sorted": ("sorted", {}),
              "sorted_blocked": ("sorted", {"fallback": "blocked"}),
              "sorted_cg": ("sorted", {"fallback": "chunked_gather"}),
              "chunked_gather": ("chunked_gather", {}),
              "cpu_kernel": ("cpu_kernel", {})}
  fns = {"base": jax.jit(lambda x, w: x @ w)}
  args = {"base": (x, w)}
  for name, (backend, kw) in variants.items():
    fns[name] = jax.jit(lambda x, a, b, backend=backend, kw=kw: rt.routed_lora(
        x, a, b, routing, 1.0 / br.R, backend=backend, **kw))
    args[name] = (x, a, b)
  return {k: 1e3 * v for k, v in br.time_pair(fns, args, repeats).items()}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--experts", type=int, nargs="+", default=[36, 166])
  p.add_argument("--time", action="store_true", help="time the CPU paths on traced routings")
  p.add_argument("--layers", default="0,5,10", help="encoder layers timed with --time")
  p.add_argument("--repeats", type=int, default=9)
  p.add_argument("--malloc", choices=cpu_malloc.MODES, default="heap")
  p.add_argument("--smoke", action="store_true", help="the tiny model of bench_routing --smoke")
  p.add_argument("--library", choices=("shared", "per-site"), default="per-site",
                 help="as bench_routing --library (session-2 figures: shared)")
  args = p.parse_args(argv)
  cpu_malloc.configure(args.malloc)
  br.STAT["name"] = "min"
  br.LIBRARY["per_site"] = args.library == "per-site"
  cfg = br.settings("smoke" if args.smoke else "quick")
  layers = [int(v) for v in args.layers.split(",") if v]
  for e in args.experts:
    traced = trace(cfg, e)
    print(f"E={e}: {len(traced)} routed sites (K={br.K}; mean rows per expert = T*K/E)")
    for site in sorted(traced):
      s = stats(traced[site], e)
      print(f"  {site:52s} T={s['tokens']:5d} max={s['max_rows']:5d} mean={s['mean_rows']:7.1f} "
            f"used={s['used']:4d} top8={s['top8_share']:.2f}", flush=True)
    if not args.time:
      continue
    for site in sorted(traced):
      parts = site.split("/")
      if parts[0] != "encoder" or int(parts[1].split("_")[1]) not in layers:
        continue
      ms = time_site(traced[site], site_dims(cfg, site), e, args.repeats)
      print(f"  time {site:47s} " + " ".join(f"{k}={v:.2f}" for k, v in ms.items()), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
