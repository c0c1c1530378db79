"""Preemption: SIGKILL at random steps + restarts, SIGTERM, and non-finite stops (subprocesses).

Uses `preempt_worker.py` (12 steps, checkpoint every 2, dropout on, shuffled in-memory data with a
resumable position). Compared bit for bit with an uninterrupted run: trainable params, optimiser
state, step, PRNG key and the data position.
"""
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
WORKER = os.path.join(HERE, "preempt_worker.py")
sys.path.insert(0, HERE)
import preempt_worker as W  # pylint: disable=g-import-not-at-top,wrong-import-position


def _start(model_dir, out, *flags):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  return subprocess.Popen([sys.executable, WORKER, str(model_dir), str(out)] + list(flags),
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_marker(proc, marker, timeout=300):
  deadline = time.time() + timeout
  while not os.path.exists(marker):
    if proc.poll() is not None:
      raise AssertionError(f"worker exited early ({proc.returncode}): {proc.stderr.read()}")
    assert time.time() < deadline, "worker never reached its blocking step"
    time.sleep(0.05)


def _assert_same(a_path, b_path):
  a, b = np.load(a_path), np.load(b_path)
  assert sorted(a.files) == sorted(b.files) and len(a.files) > 5
  assert int(a["['step']"]) == W.STEPS and int(a["data_position"]) == W.STEPS
  for k in a.files:
    assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
    assert a[k].tobytes() == b[k].tobytes(), f"{k} differs"


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """The uninterrupted run, started in the background (it overlaps the interrupted runs)."""
  d = tmp_path_factory.mktemp("straight")
  proc = _start(d / "run", d / "final.npz")

  def result():
    if proc.returncode is None:
      _, err = proc.communicate(timeout=400)
      assert proc.returncode == 0, err[-3000:]
    return d / "final.npz"
  yield result
  if proc.poll() is None:
    proc.kill()
    proc.wait()


def test_sigkill_at_three_random_steps_then_resume_is_bitwise_identical(tmp_path, straight):
  kill_at = sorted(random.Random(20240611).sample(range(1, W.STEPS), 3))
  run = tmp_path / "run"
  for k in kill_at:
    marker = tmp_path / f"marker{k}"
    proc = _start(run, tmp_path / "unused.npz", f"--block_at={k}", f"--marker={marker}")
    _wait_marker(proc, marker)
    # No grace period: an async checkpoint of the previous step may be in flight.
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
  proc = _start(run, tmp_path / "resumed.npz")
  _, err = proc.communicate(timeout=400)
  assert proc.returncode == 0, err[-3000:]
  _assert_same(straight(), tmp_path / "resumed.npz")


def test_sigterm_saves_the_interrupted_step_exits_143_and_restart_resumes(tmp_path, straight):
  run, marker = tmp_path / "run", tmp_path / "marker"
  proc = _start(run, tmp_path / "unused.npz", "--pause_at=4", f"--marker={marker}")
  _wait_marker(proc, marker)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
  assert "Traceback" not in out + err
  # Batch 4 was being fetched: step 5 completes, then the loop stops and saves step 5, which is
  # not a regular checkpoint step (every 2).
  steps = sorted(int(n) for n in os.listdir(run / "checkpoints") if n.isdigit())
  assert steps == [2, 4, 5], steps
  proc = _start(run, tmp_path / "resumed.npz")
  out, err = proc.communicate(timeout=400)
  assert proc.returncode == 0, err[-3000:]
  assert "resumed from" in out + err and "(step 5)" in out + err
  _assert_same(straight(), tmp_path / "resumed.npz")


def test_non_finite_loss_stops_with_one_line_and_keeps_last_good_checkpoint(tmp_path):
  run = tmp_path / "run"
  proc = _start(run, tmp_path / "unused.npz", "--nan_at=7")
  out, err = proc.communicate(timeout=400)
  assert proc.returncode == 1, err[-3000:]
  lines = [l for l in err.splitlines() if l.strip()]
  assert len(lines) == 1 and "Traceback" not in out + err, err
  assert "non-finite" in lines[0] and "step 8" in lines[0] and "last good checkpoint: step 6" \
      in lines[0], lines[0]
  steps = sorted(int(n) for n in os.listdir(run / "checkpoints") if n.isdigit())
  assert steps[-1] == 6, steps  # nothing was saved for the bad step
