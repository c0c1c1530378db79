"""Evaluation on an 8-device mesh (4 data x 2 model): parameters and a routed library placed by
the rules, scoring and greedy decoding traced under the mesh, equal to one device; batches that
do not divide the data shards are padded."""
import json
import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CODE = r"""
import functools, json
import jax, numpy as np
from phatgoose_jax import adapters
from phatgoose_jax.evaluation import generation, placement, scoring
from phatgoose_jax.models import tiny_config
from phatgoose_jax.training import partitioning
t5 = tiny_config(num_encoder_layers=2, num_decoder_layers=2, dropout_rate=0.0)
model = adapters.build_model(t5, adapters.AdapterConfig(mode="routed", router="phatgoose",
                                                        num_experts=8, rank=3, top_k=2))
shapes = jax.eval_shape(functools.partial(adapters.init_variables, model), jax.random.key(0))
rng = np.random.default_rng(0)
variables = {k: jax.tree.map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(s.dtype),
                             shapes[k]) for k in ("params", "adapters")}
enc = rng.integers(3, t5.vocab_size, (6, 9)).astype(np.int32); enc[:, -2:] = 0; enc[:, -3] = 1
tgt = rng.integers(3, t5.vocab_size, (6, 5)).astype(np.int32); tgt[:, -1] = 1
want = scoring.score_rows(model, variables, enc, tgt)
want_tokens = generation.generate_tokens(model, variables, enc[:3], 4)
placed, mesh, rules = placement.place_for_evaluation(model, variables, num_partitions=2)
with partitioning.partitioning_scope(mesh, rules):
  assert partitioning.active_batch_shards() == 4
  got = scoring.score_rows(model, placed, enc, tgt)
  got_tokens = generation.generate_tokens(model, placed, enc[:3], 4)
# a library with more sites than an encoder-only routed model: the extra sites are unused
enc_model = adapters.build_model(t5, adapters.AdapterConfig(
    mode="routed", router="phatgoose", num_experts=8, rank=3, top_k=2, site_pattern="encoder/.*"))
want_enc = scoring.score_rows(enc_model, variables, enc, tgt)
placed_enc, mesh2, rules2 = placement.place_for_evaluation(enc_model, variables, num_partitions=2)
assert "decoder" not in placed_enc["adapters"]
with partitioning.partitioning_scope(mesh2, rules2):
  got_enc = scoring.score_rows(enc_model, placed_enc, enc, tgt)
enc_diff = float(max(np.abs(got_enc[k] - want_enc[k]).max() for k in want_enc))
flat = lambda t: {"/".join(str(getattr(k, "key", k)) for k in p): v
                  for p, v in jax.tree_util.tree_flatten_with_path(t)[0]}
specs = {k: [str(a) for a in v.sharding.spec] for k, v in {**flat(placed["params"]),
                                                           **flat(placed["adapters"])}.items()}
print("REPORT", json.dumps({
    "mesh": dict(mesh.shape), "specs": specs,
    "score_diff": float(max(np.abs(got[k] - want[k]).max() for k in want)),
    "encoder_only_diff": enc_diff,
    "tokens_equal": bool((got_tokens == want_tokens).all()),
    "lengths_equal": bool((got["length"] == want["length"]).all())}))
"""


def test_evaluation_on_a_mesh_equals_one_device():
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run([sys.executable, "-c", _CODE], env=env, capture_output=True, text=True,
                        timeout=400)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout.split("REPORT", 1)[1].strip().splitlines()[0])
  assert report["mesh"] == {"data": 4, "model": 2}
  assert report["score_diff"] < 1e-5 and report["tokens_equal"] and report["lengths_equal"]
  assert report["encoder_only_diff"] < 1e-5
  specs = report["specs"]
  # kernels split over 'model', the library's 8 experts over 'data' (as in training)
  assert any("model" in s for k, s in specs.items() if k.endswith("wi_0/kernel")), specs
  lora_a = [s for k, s in specs.items() if k.endswith("lora_a")]
  assert lora_a and all(s[0] == "data" for s in lora_a), lora_a
