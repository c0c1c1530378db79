"""Subprocess tests: kill -9 after a checkpoint + resume is bitwise; 8-device sharding == 1 device."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import training_helpers as F  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = os.path.dirname(os.path.dirname(HERE))


def _python(code: str, extra_env=None) -> subprocess.Popen:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([HERE, REPO]))
  env.update(extra_env or {})
  return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _run_on_8_devices(code: str, timeout: int = 300) -> str:
  """Runs ``code`` on 8 emulated CPU devices; its output (it must exit 0)."""
  proc = _python(code, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  out, _ = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, out
  return out


def test_kill_after_checkpoint_then_resume_is_bitwise_equal_to_straight_run(tmp_path):
  killed_dir, straight_dir = str(tmp_path / "killed"), str(tmp_path / "straight")
  marker = str(tmp_path / "blocked")
  proc = _python(f"import training_helpers as F; F.resume_worker({killed_dir!r}, "
                 f"{str(tmp_path / 'unused.npz')!r}, block_at=10, marker={marker!r})")
  # The straight 20-step run happens here meanwhile (same code, same XLA CPU compile).
  F.resume_worker(straight_dir, str(tmp_path / "straight.npz"))
  step10 = os.path.join(killed_dir, "checkpoints", "10")
  deadline = time.time() + 240
  while not (os.path.exists(marker) and os.path.isdir(step10)):
    assert proc.poll() is None, proc.stdout.read()
    assert time.time() < deadline, "the killed run never reached its step-10 checkpoint"
    time.sleep(0.2)
  time.sleep(1.0)  # let the async save's metadata land (finalised dir name is atomic anyway)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  resumed = _python(f"import training_helpers as F; F.resume_worker({killed_dir!r}, "
                    f"{str(tmp_path / 'resumed.npz')!r})")
  out, _ = resumed.communicate(timeout=300)
  assert resumed.returncode == 0, out
  a, b = np.load(tmp_path / "straight.npz"), np.load(tmp_path / "resumed.npz")
  assert sorted(a.files) == sorted(b.files) and len(a.files) > 4
  assert int(a["['step']"]) == 20
  for k in a.files:
    assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k
  # The resumed process really restored (and did not retrain from scratch): its log says so.
  assert "resumed from" in out


def test_sharded_train_step_matches_single_device():
  out = _run_on_8_devices("import training_helpers as F; F.sharding_worker()", timeout=400)
  report = json.loads(out.split("REPORT", 1)[1].strip().splitlines()[0])
  for mode in ("lora", "routed"):
    r = report[mode]
    assert r["max_diff"] <= 1e-5, (mode, r)
    np.testing.assert_allclose(r["loss"][0], r["loss"][1], rtol=1e-5)
    assert r["batch_spec"] == ["data"]
    assert r["logits_spec"] == [None, "model"]  # logits_dense [embed, vocab]: vocab -> model
  routed_specs = report["routed"]["specs"]
  lora_a = [s for k, s in routed_specs.items() if k.endswith("lora_a")]
  assert lora_a and all(s[0] == "data" for s in lora_a), routed_specs  # expert axis over data


def test_train_step_applies_the_models_logical_activation_constraints():
  """The steps are traced under the mesh and the rules table, so the model's
  `logical_constraint` activations become sharding constraints (none outside that scope)."""
  code = (
      "import training_helpers as F\n"
      "_, model, variables = F.make_model('lora')\n"
      "counts = []\n"
      "for scoped in (False, True):  # a fresh trainer each: jit caches its first trace\n"
      "  tr = F.make_trainer(model, variables, 'lora', num_partitions=2)\n"
      "  state = tr.create_state(variables)\n"
      "  b = tr._device_batch(F.random_batch(0, batch_size=8))\n"
      "  if scoped:\n"
      "    with tr._partitioning():\n"
      "      txt = tr._train_step.lower(state, tr.base_params, b).as_text()\n"
      "  else:\n"
      "    txt = tr._train_step.lower(state, tr.base_params, b).as_text()\n"
      "  counts.append(txt.count('sharding_constraint'))\n"
      "print('COUNTS', *counts)\n")
  out = _run_on_8_devices(code)
  bare, inside = map(int, out.split("COUNTS", 1)[1].split()[:2])
  assert inside > bare


def test_batches_that_do_not_split_over_the_data_shards():
  """8 data shards: an evaluation batch of any size is padded up to a multiple of 8 (same loss
  as one device), a training batch of 6 rows is a one-line error naming BATCH_SIZE and the mesh
  (JAX's IndivisibleError named neither)."""
  code = (
      "import jax, numpy as np\n"
      "import training_helpers as F\n"
      "from phatgoose_jax.training import partitioning\n"
      "_, model, variables = F.make_model('lora')\n"
      "one = F.make_trainer(model, variables, 'lora', devices=jax.devices()[:1])\n"
      "eight = F.make_trainer(model, variables, 'lora')\n"
      "assert dict(eight.mesh.shape) == {'data': 8, 'model': 1}\n"
      "assert partitioning.local_batch_shards(eight.mesh, eight.rules) == 8\n"
      "s1, s8 = one.create_state(variables), eight.create_state(variables)\n"
      "full = F.random_batch(0, batch_size=12)\n"
      "parts = [{k: v[:8] for k, v in full.items()}, {k: v[8:11] for k, v in full.items()}]\n"
      "a = one.evaluate(s1, parts)\n"
      "for bs in (None, 12):\n"
      "  b = eight.evaluate(s8, parts, batch_size=bs)\n"
      "  assert a['tokens'] == b['tokens'], (a, b)\n"
      "  np.testing.assert_allclose(a['loss'], b['loss'], rtol=1e-5)\n"
      "try:\n"
      "  eight.train_step(s8, F.random_batch(0, batch_size=6))\n"
      "except ValueError as e:\n"
      "  print('ERROR', e)\n")
  out = _run_on_8_devices(code)
  err = out.split("ERROR", 1)[1].strip().splitlines()[0]
  assert "6 rows per host does not split over the 8 data-parallel shards" in err
  assert "BATCH_SIZE" in err and "'data': 8" in err


def test_train_refuses_a_batch_size_the_mesh_cannot_split_before_loading(tmp_path):
  """python -m phatgoose_jax.train on 8 devices with BATCH_SIZE=12: one line, exit 2, before the
  (here missing) checkpoint is read."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run(
      [sys.executable, "-m", "phatgoose_jax.train", "--gin_file=runs/train_expert.gin",
       "--gin_file=models/tiny.gin", f"--gin.MODEL_DIR='{tmp_path}/run'",
       "--gin.MIXTURE_OR_TASK_NAME='x'", f"--gin.INITIAL_CHECKPOINT_PATH='{tmp_path}/nockpt'",
       "--gin.BATCH_SIZE=12"], env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert "BATCH_SIZE of 12 rows per host does not split over the 8 data-parallel shards" in last
  assert "Traceback" not in proc.stderr
