"""Trainer: frozen leaves stay bitwise, gradient accumulation, non-finite stop, fit + export."""
import json
import os
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import training_helpers as F
from phatgoose_jax.training import NonFiniteError, load_exported_adapters
from phatgoose_jax.training import state as state_lib


@pytest.fixture(scope="module")
def lora_setup():
  _, model, variables = F.make_model("lora")
  trainer = F.make_trainer(model, variables, "lora", warmup_steps=0)
  return model, variables, trainer


def test_lora_mode_only_lora_leaves_change_and_base_is_bitwise_equal(lora_setup):
  _, variables, trainer = lora_setup
  base_before = F.to_numpy(variables["params"])
  state = trainer.create_state(variables)
  for i in range(3):
    state, metrics = trainer.train_step(state, F.random_batch(i))
    assert bool(metrics["finite"])
  assert int(state["step"]) == 3
  base_after = F.to_numpy(trainer.base_params)
  for a, b in zip(jax.tree.leaves(base_before), jax.tree.leaves(base_after)):
    assert a.tobytes() == b.tobytes()
  before = state_lib.flatten(variables["adapters"])
  after = state_lib.flatten(F.to_numpy(trainer.adapters(state)))
  assert set(before) == set(after)
  for k in before:
    assert not np.array_equal(before[k], after[k]), k  # every lora_a / lora_b trained


def test_gate_mode_only_gates_change():
  _, model, variables = F.make_model("gated_lora")
  trainer = F.make_trainer(model, variables, "gate")
  state = trainer.create_state(variables)
  for i in range(2):
    state, _ = trainer.train_step(state, F.random_batch(i))
  before = state_lib.flatten(variables["adapters"])
  after = state_lib.flatten(F.to_numpy(trainer.adapters(state)))
  gates = [k for k in before if k.endswith("/gate")]
  assert gates and len(gates) * 3 == len(before)
  for k in before:
    changed = not np.array_equal(before[k], after[k])
    assert changed == k.endswith("/gate"), k
  # Frozen LoRA leaves carry no optimiser state: only gate-shaped moments exist.
  opt_shapes = {x.shape for x in jax.tree.leaves(state["opt_state"]) if x.ndim}
  assert opt_shapes == {(24,), (40,)}


@pytest.mark.parametrize("normalization,pad", [("microbatch_mean", False), ("tokens", True)])
def test_two_microbatches_equal_one_double_batch(lora_setup, normalization, pad):
  model, variables, single = lora_setup
  batch = F.random_batch(0, batch_size=4, pad=pad)
  if not pad:
    assert (batch["decoder_loss_weights"].sum(1) == F.DEC_LEN).all()
  else:  # Unequal token counts in the two microbatches (rows 0::2 and 1::2).
    w = batch["decoder_loss_weights"]
    assert w[0::2].sum() != w[1::2].sum()
  out = {}
  for m in (1, 2):
    trainer = single if m == 1 else F.make_trainer(
        model, variables, "lora", warmup_steps=0, num_microbatches=m,
        loss_normalization=normalization)
    state = trainer.create_state(variables)
    state, metrics = trainer.train_step(state, batch)
    out[m] = (F.to_numpy(state["trainable"]), float(metrics["loss"]))
  np.testing.assert_allclose(out[1][1], out[2][1], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(out[1][0]), jax.tree.leaves(out[2][0])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  assert not np.allclose(jax.tree.leaves(out[1][0])[0],
                         jax.tree.leaves(F.to_numpy(variables["adapters"]))[0])


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(lora_setup, tmp_path):
  _, variables, trainer = lora_setup

  def data():
    for i in range(100):
      b = F.random_batch(i)
      if i == 3:
        b["decoder_loss_weights"] = b["decoder_loss_weights"] * np.nan
      yield b
  state = trainer.create_state(variables)
  with pytest.raises(NonFiniteError, match="step 4.*last good checkpoint: step 2"):
    trainer.fit(state, data(), steps=10, model_dir=str(tmp_path), checkpoint_every=2,
                progress=False, handle_signals=False)
  ckpt = state_lib.Checkpointer(str(tmp_path))
  assert ckpt.latest_step() == 2
  ckpt.close()


def test_gate_recipe_validates_only_the_last_step_so_step_0_is_never_exported(tmp_path):
  """runs/train_gate.gin: validate_at_start=False and eval_every=None, as the official
  train_gate.sh (no evaluation before training, one at the end). A metric that favours the
  untrained step 0 cannot select the zero-initialised gate."""
  _, model, variables = F.make_model("gated_lora")
  trainer = F.make_trainer(model, variables, "gate")
  evals = []

  def eval_fn(state):
    evals.append(int(state["step"]))
    return {"loss": 0.0 if int(state["step"]) == 0 else 1.0}
  result = trainer.fit(trainer.create_state(variables), F.batches(), steps=4,
                       model_dir=str(tmp_path), eval_every=None, validate_at_start=False,
                       eval_fn=eval_fn, progress=False, handle_signals=False)
  assert evals == [4] and result.best["step"] == 4
  adapters, meta = load_exported_adapters(str(tmp_path))
  gates = [v for k, v in state_lib.flatten(adapters).items() if k.endswith("/gate")]
  assert meta["step"] == 4 and gates and all(np.abs(g).sum() > 0 for g in gates)


def test_a_run_that_fails_leaves_an_export_marked_incomplete(lora_setup, tmp_path):
  _, variables, trainer = lora_setup

  def failing_batches():
    yield F.random_batch(0)
    raise RuntimeError("disk went away")
  with pytest.raises(RuntimeError, match="disk went away"):
    trainer.fit(trainer.create_state(variables), failing_batches(), steps=4,
                model_dir=str(tmp_path), eval_every=1, eval_fn=lambda s: {"loss": 1.0},
                progress=False, handle_signals=False)
  _, meta = load_exported_adapters(str(tmp_path))
  assert meta["complete"] is False and meta["step"] == 0
  with pytest.raises(state_lib.ExportError, match="has not finished"):
    state_lib.require_complete_export(meta, str(tmp_path))


def test_fit_validates_at_step_zero_selects_best_and_exports(lora_setup, tmp_path):
  _, variables, trainer = lora_setup
  evals = []

  def eval_fn(state):  # A scripted metric: best at step 4.
    step = int(state["step"])
    evals.append(step)
    return {"loss": {0: 5.0, 2: 3.0, 4: 1.0, 6: 2.0}[step]}
  state = trainer.create_state(variables)
  result = trainer.fit(state, F.batches(), steps=6, model_dir=str(tmp_path), eval_every=2,
                       eval_fn=eval_fn, checkpoint_every=3, progress=False,
                       handle_signals=False, base_fingerprint="sha256:abc",
                       export_metadata={"task": "t", "rank": 3})
  assert evals == [0, 2, 4, 6]
  assert result.best == {"step": 4, "metric": "loss", "value": 1.0}
  adapters, meta = load_exported_adapters(str(tmp_path))
  assert meta["step"] == 4 and meta["task"] == "t" and meta["base_fingerprint"] == "sha256:abc"
  assert meta["complete"] is True  # the run finished
  assert all(k.rsplit("/", 1)[1] in ("lora_a", "lora_b") for k in meta["keys"])
  assert "encoder/layers_0/attention/query" in meta["sites"]
  final = state_lib.flatten(F.to_numpy(trainer.adapters(result.state)))
  exported = state_lib.flatten(adapters)
  assert set(final) == set(exported)
  assert any(not np.array_equal(final[k], exported[k]) for k in final)  # best != final
  lines = [json.loads(l) for l in open(os.path.join(tmp_path, "metrics.jsonl"))]
  assert [l["step"] for l in lines if l["split"] == "eval"] == [0, 2, 4, 6]
  assert os.path.isdir(os.path.join(tmp_path, "tensorboard", "train"))


def test_read_export_metadata_without_the_weights(tmp_path):
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  export = tmp_path / state_lib.EXPORT_DIR
  export.mkdir()
  save_file({"site/lora_a": np.zeros((2, 1), np.float32)}, str(export / state_lib.EXPORT_WEIGHTS))
  assert state_lib.read_export_metadata(str(tmp_path)) == {}
  (export / state_lib.EXPORT_METADATA).write_text('{"rank": 1, "complete": false}')
  assert state_lib.read_export_metadata(str(tmp_path)) == {"rank": 1, "complete": False}
  (export / state_lib.EXPORT_METADATA).write_text("[1")
  with pytest.raises(state_lib.ExportError, match="not valid JSON"):
    state_lib.read_export_metadata(str(tmp_path))
