"""A library stacked and sharded along the expert axis over 8 emulated devices (issue: experts).

In a subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``: a library of 8
experts is stacked, placed with the 'expert' axis over the 8-way mesh axis, and a routed PHATGOOSE
forward (jitted with those shardings) equals the single-device forward; every device holds exactly
1/8 of the library's bytes.
"""
import json
import os
import subprocess
import sys
import textwrap

WORKER = textwrap.dedent(r"""
  import json, os, tempfile
  import jax, jax.numpy as jnp, numpy as np
  from jax.sharding import Mesh
  from phatgoose_jax.adapters import AdapterConfig, build_model, site_names
  from phatgoose_jax.checkpoints import params_fingerprint
  from phatgoose_jax.library import ExpertLibrary, place_stacked, to_adapters_tree
  from phatgoose_jax.models import Transformer, tiny_config

  assert jax.device_count() == 8
  cfg = tiny_config()
  tok = jnp.ones((1, 4), jnp.int32)
  params = Transformer(cfg).init(jax.random.PRNGKey(0), tok, tok, tok, enable_dropout=False)["params"]
  lib = ExpertLibrary.create(os.path.join(tempfile.mkdtemp(), "lib"), params_fingerprint(params), cfg)
  rng = np.random.default_rng(0)
  sites = site_names(cfg)
  probe = build_model(cfg, AdapterConfig(mode="lora", rank=3)).init(
      jax.random.PRNGKey(1), tok, tok, tok, enable_dropout=False)["adapters"]
  def leaf(tree, site):
    for part in site.split("/"):
      tree = tree[part]
    return tree
  for e in range(8):
    lora = {s: {k: rng.standard_normal(np.shape(leaf(probe, s)[k])).astype(np.float32) * 0.3
                for k in ("lora_a", "lora_b")} for s in sites}
    gates = {s: rng.standard_normal(lora[s]["lora_a"].shape[0]).astype(np.float32) for s in sites}
    lib.add(f"e{e}", lora, scale=1.0 / 3, gates=gates)
  stacked = lib.stack(vectors="gate")
  model = build_model(cfg, AdapterConfig(mode="routed", num_experts=8, rank=3, top_k=2,
                                         router="phatgoose"))
  enc = jnp.asarray(rng.integers(2, 96, (4, 9)), jnp.int32)
  dec = jnp.asarray(rng.integers(2, 96, (4, 5)), jnp.int32)
  fwd = jax.jit(lambda p, a: model.apply({"params": p, "adapters": a}, enc, dec, dec,
                                         enable_dropout=False))
  single = np.asarray(fwd(params, to_adapters_tree(stacked)))
  mesh = Mesh(np.array(jax.devices()).reshape(8, 1), ("data", "model"))
  placed = place_stacked(stacked, mesh, "data")
  sharded = np.asarray(fwd(params, to_adapters_tree(placed)))
  total = sum(np.asarray(v).nbytes for leaves in stacked.values() for v in leaves.values())
  per_device = {}
  for leaves in placed.values():
    for v in leaves.values():
      for shard in v.addressable_shards:
        per_device[shard.device.id] = per_device.get(shard.device.id, 0) + shard.data.nbytes
  print("REPORT" + json.dumps({"max_diff": float(np.abs(single - sharded).max()),
                               "total": total, "per_device": sorted(per_device.values()),
                               "spec": str(placed[sites[0]]["lora_a"].sharding.spec)}))
""")


def test_sharded_library_forward_and_bytes_per_device(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run([sys.executable, "-c", WORKER], env=env, capture_output=True, text=True,
                        timeout=600, cwd=str(tmp_path))
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout.split("REPORT", 1)[1])
  assert report["max_diff"] <= 1e-5
  assert len(report["per_device"]) == 8
  assert all(b * 8 == report["total"] for b in report["per_device"]), report
  assert "data" in report["spec"]
