"""Trainer.evaluate: a partial last batch is padded (every row counts, shape unchanged), zero
scored tokens is an error, and hosts with different batch counts run the same number of steps."""
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import training_helpers as F  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


@pytest.fixture(scope="module")
def setup():
  _, model, variables = F.make_model("lora")
  trainer = F.make_trainer(model, variables, "lora")
  return trainer, trainer.create_state(variables)


def _rows(batch, sl):
  return {k: v[sl] for k, v in batch.items()}


def test_partial_last_batch_is_padded_and_every_row_counts(setup):
  trainer, state = setup
  full = F.random_batch(0, batch_size=4)
  want = trainer.evaluate(state, [_rows(full, slice(0, 3))])  # 3 rows, unpadded
  got = trainer.evaluate(state, [_rows(full, slice(0, 3))], batch_size=4)  # padded to 4
  assert got["tokens"] == want["tokens"] == float(full["decoder_loss_weights"][:3].sum())
  np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-6)
  with pytest.raises(ValueError, match="more than batch_size"):
    trainer.evaluate(state, [full], batch_size=3)


def test_no_scored_tokens_is_an_error_not_a_zero_loss(setup):
  trainer, state = setup
  with pytest.raises(ValueError, match="no target tokens"):
    trainer.evaluate(state, [])
  empty = {k: np.zeros_like(v) for k, v in F.random_batch(0).items()}
  with pytest.raises(ValueError, match="no target tokens"):
    trainer.evaluate(state, [empty])


_WORKER = r"""
import sys
pid, port = int(sys.argv[1]), int(sys.argv[2])
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
sys.path.insert(0, sys.argv[3])
import training_helpers as F
_, model, variables = F.make_model("lora")
trainer = F.make_trainer(model, variables, "lora")
state = trainer.create_state(variables)
count = 3 if pid == 0 else 1  # hosts hold different numbers of validation batches
m = trainer.evaluate(state, [F.random_batch(i, batch_size=2, seed=pid) for i in range(count)])
print("RESULT", pid, m["tokens"], m["loss"], flush=True)
"""


def test_hosts_with_different_batch_counts_finish_with_the_same_result(tmp_path):
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  script = tmp_path / "worker.py"
  script.write_text(_WORKER)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  procs = [subprocess.Popen([sys.executable, str(script), str(i), str(port), HERE], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = []
  for p in procs:
    try:
      out, err = p.communicate(timeout=240)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail("a host hung in multi-host validation")
    assert p.returncode == 0, err[-3000:]
    outs.append(next(l for l in out.splitlines() if l.startswith("RESULT")).split())
  assert outs[0][2:] == outs[1][2:]  # one global result, seen by both hosts
  assert float(outs[0][2]) > 0
