"""Helpers shared by the training tests (no tests here): a tiny adapter model, random batches."""
from __future__ import annotations

import functools

import numpy as np
import jax

from phatgoose_jax import adapters
from phatgoose_jax.models import tiny_config
from phatgoose_jax.training import adamw_optimizer, create_mesh, logical_axis_rules, Trainer

ENC_LEN, DEC_LEN = 7, 5


def make_model(mode: str = "lora", dropout: float = 0.0, num_experts: int = 1, **cfg):
  cfg.setdefault("num_encoder_layers", 1)
  cfg.setdefault("num_decoder_layers", 1)
  t5 = tiny_config(dropout_rate=dropout, **cfg)
  acfg = adapters.AdapterConfig(mode=mode, rank=3, num_experts=num_experts,
                                top_k=min(2, num_experts), router="uniform"
                                if mode == "routed" else "phatgoose")
  model = adapters.build_model(t5, acfg)
  variables = fast_init(model)
  return t5, model, variables


def fast_init(model, seed: int = 0) -> dict:
  """Variables with init's structure and axes, values drawn with numpy (no compile: fast).

  Every float leaf is N(0, 0.05^2) (adapter leaves too, so that lora_b and gates get gradients);
  deterministic in ``seed`` across processes.
  """
  shapes = jax.eval_shape(functools.partial(adapters.init_variables, model), jax.random.key(0))
  rng = np.random.default_rng(seed)
  out = dict(shapes)
  for name in ("params", "adapters"):
    out[name] = jax.tree.map(
        lambda s: (0.05 * rng.standard_normal(s.shape)).astype(s.dtype), shapes[name])
  return out


def random_batch(index: int, batch_size: int = 4, vocab: int = 96, seed: int = 0,
                 pad: bool = True) -> dict:
  """A deterministic batch in t5x layout; rows have different lengths when ``pad``."""
  rng = np.random.default_rng([seed, index])
  enc = rng.integers(3, vocab, (batch_size, ENC_LEN)).astype(np.int32)
  tgt = rng.integers(3, vocab, (batch_size, DEC_LEN)).astype(np.int32)
  if pad:
    for b in range(batch_size):
      enc[b, rng.integers(3, ENC_LEN + 1):] = 0
      tgt[b, rng.integers(2, DEC_LEN + 1):] = 0
  dec_in = np.concatenate([np.zeros((batch_size, 1), np.int32), tgt[:, :-1]], 1)
  return {"encoder_input_tokens": enc, "decoder_input_tokens": dec_in,
          "decoder_target_tokens": tgt, "decoder_loss_weights": (tgt > 0).astype(np.float32)}


def batches(start: int = 0, **kw):
  i = start
  while True:
    yield random_batch(i, **kw)
    i += 1


def make_trainer(model, variables, what: str = "lora", devices=None, num_partitions: int = 1,
                 lr: float = 5e-2, warmup_steps: int = 2, total_steps: int = 20, **kw):
  mask = adapters.trainable_mask(variables["adapters"], what)
  mesh = create_mesh(num_partitions, devices)
  tx = adamw_optimizer(learning_rate=lr, total_steps=total_steps, warmup_steps=warmup_steps)
  return Trainer(model, mask, tx, mesh, logical_axis_rules(), **kw)


def to_numpy(tree):
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


class _BlockingBatches:
  """Batches 0, 1, ...; with ``block_at`` set, writes ``marker`` and sleeps when asked for that one."""

  def __init__(self, block_at=None, marker=None):
    self.i, self.block_at, self.marker = 0, block_at, marker

  def __iter__(self):
    return self

  def __next__(self):
    if self.block_at is not None and self.i == self.block_at:
      import time  # pylint: disable=g-import-not-at-top
      open(self.marker, "w").close()
      while True:
        time.sleep(1)
    batch = random_batch(self.i)
    self.i += 1
    return batch


def resume_worker(model_dir: str, out_npz: str, block_at=None, marker=None) -> None:
  """20 steps with dropout, checkpoints every 10, final trainable + optimiser state to ``out_npz``."""
  _, model, variables = make_model("lora", dropout=0.1)
  trainer = make_trainer(model, variables, "lora", warmup_steps=3, total_steps=20)
  state = trainer.create_state(variables, seed=7)
  result = trainer.fit(state, _BlockingBatches(block_at, marker), steps=20, model_dir=model_dir,
                       checkpoint_every=10, progress=False, handle_signals=False,
                       base_fingerprint="sha256:test")
  leaves = jax.tree_util.tree_leaves_with_path(
      {"trainable": result.state["trainable"], "opt_state": result.state["opt_state"],
       "step": result.state["step"], "rng": result.state["rng"]})
  np.savez(out_npz, **{jax.tree_util.keystr(p): np.asarray(jax.device_get(x)) for p, x in leaves})


def sharding_worker() -> dict:
  """One LoRA step and one routed (E=4) step on a (4 data x 2 model) mesh vs one device."""
  import json  # pylint: disable=g-import-not-at-top
  assert jax.device_count() == 8, jax.devices()
  report = {}
  for mode, kw in (("lora", {}), ("routed", {"num_experts": 4})):
    _, model, variables = make_model(mode, **kw)
    results = {}
    for name, devices, parts in (("single", jax.devices()[:1], 1), ("sharded", None, 2)):
      trainer = make_trainer(model, variables, "lora", devices=devices, num_partitions=parts,
                             warmup_steps=0)
      state = trainer.create_state(variables)
      for i in range(2):
        state, metrics = trainer.train_step(state, random_batch(i, batch_size=8))
      results[name] = (to_numpy(state["trainable"]), float(metrics["loss"]),
                       {k: list(v.sharding.spec) for k, v in
                        __import__("phatgoose_jax.training.state", fromlist=["x"]).flatten(
                            state["trainable"]).items()},
                       list(trainer._batch_sharding.spec),  # pylint: disable=protected-access
                       list(jax.tree.leaves(trainer.base_params["decoder"]["logits_dense"])[0]
                            .sharding.spec))
    diffs = [float(np.max(np.abs(a - b))) for a, b in
             zip(jax.tree.leaves(results["single"][0]), jax.tree.leaves(results["sharded"][0]))]
    report[mode] = {"max_diff": max(diffs), "loss": [results["single"][1], results["sharded"][1]],
                    "specs": results["sharded"][2], "batch_spec": results["sharded"][3],
                    "logits_spec": results["sharded"][4]}
  print("REPORT" + json.dumps(report))
  return report
