"""A tiny training run for the preemption tests (no tests here).

``python preempt_worker.py MODEL_DIR OUT_NPZ [--block_at=K] [--pause_at=K] [--nan_at=K]
[--marker=PATH]`` trains a 1+1-layer T5 LoRA (dropout 0.1) for `STEPS` steps on in-memory,
pre-tokenised examples (`pipeline.iterate_numpy_batches`: shuffled epochs, truncation, empty
dropping), checkpointing every 2 steps, with SIGTERM/SIGINT handling as ``phatgoose_jax.train``.
The data iterator exposes ``state()`` / ``restore()`` so the checkpoint records its position.

  --block_at=K  when batch K (0-based, global position) is requested: write MARKER, sleep forever
                (the test then SIGKILLs the process);
  --pause_at=K  the same, but return the batch after 3 s (the test sends SIGTERM meanwhile);
  --nan_at=K    batch K gets NaN loss weights (non-finite loss).
Exit codes as ``phatgoose_jax.train``: 0 done, 1 non-finite (one line on stderr), 128+signal.
On success OUT_NPZ receives step, rng, trainable leaves, optimiser state and data position.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "training"))

STEPS, CHECKPOINT_EVERY, BATCH, LENGTHS = 12, 2, 4, {"inputs": 7, "targets": 5}


def examples(n: int = 22, seed: int = 0) -> list:
  """Pre-tokenised rows; some longer than LENGTHS (truncated), two empty (dropped)."""
  rng = np.random.default_rng(seed)
  rows = []
  for i in range(n):
    inputs = rng.integers(3, 96, rng.integers(1, 12)).tolist()
    targets = rng.integers(3, 96, rng.integers(1, 8)).tolist()
    if i == 5:
      inputs = []
    if i == 11:
      targets = []
    rows.append({"inputs": inputs, "targets": targets})
  return rows


class Batches:
  """Deterministic shuffled batches with a resumable position (batches consumed)."""

  def __init__(self, block_at=None, pause_at=None, nan_at=None, marker=None):
    self.position = 0
    self.block_at, self.pause_at, self.nan_at, self.marker = block_at, pause_at, nan_at, marker
    self._it = None

  def _start(self):
    from phatgoose_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    self._it = pipeline.iterate_numpy_batches(
        examples(), None, LENGTHS, BATCH, shuffle=True, seed=3, num_epochs=None,
        drop_remainder=True, start_batch=self.position)

  def state(self):
    return {"position": self.position}

  def restore(self, state):
    self.position = int(state["position"])
    self._it = None

  def __iter__(self):
    return self

  def __next__(self):
    if self._it is None:
      self._start()
    if self.position in (self.block_at, self.pause_at):
      open(self.marker, "w").close()
      if self.position == self.block_at:
        while True:
          time.sleep(1)
      time.sleep(3)
    batch = next(self._it)
    if self.position == self.nan_at:
      batch = dict(batch, decoder_loss_weights=np.full(batch["decoder_target_tokens"].shape,
                                                       np.nan, np.float32))
    self.position += 1
    return batch


def main(argv) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  import training_helpers as F  # pylint: disable=g-import-not-at-top
  from phatgoose_jax import training  # pylint: disable=g-import-not-at-top
  model_dir, out_npz = argv[0], argv[1]
  opts = dict(a[2:].split("=", 1) for a in argv[2:])
  ints = {k: int(opts[k]) for k in ("block_at", "pause_at", "nan_at") if k in opts}
  _, model, variables = F.make_model("lora", dropout=0.1)
  trainer = F.make_trainer(model, variables, "lora", warmup_steps=3, total_steps=STEPS)
  state = trainer.create_state(variables, seed=7)
  data = Batches(marker=opts.get("marker"), **ints)
  try:
    result = trainer.fit(state, data, steps=STEPS, model_dir=model_dir,
                         checkpoint_every=CHECKPOINT_EVERY, progress=False,
                         base_fingerprint="sha256:preempt-test")
  except training.NonFiniteError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  if result.interrupted is not None:
    return 128 + int(result.interrupted)
  leaves = jax.tree_util.tree_leaves_with_path(
      {"trainable": result.state["trainable"], "opt_state": result.state["opt_state"],
       "step": result.state["step"], "rng": result.state["rng"]})
  arrays = {jax.tree_util.keystr(p): np.asarray(jax.device_get(x)) for p, x in leaves}
  arrays["data_position"] = np.asarray(data.position)
  np.savez(out_npz, **arrays)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
