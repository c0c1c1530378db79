"""Two hosts whose adapters are sharded across hosts (t5x's parameter_partitioning_dims=2 puts
``embed`` on the data axis) export the same adapters as one host with the same devices (host 0
used to fetch arrays it cannot address: a crash, and with validation a hang)."""
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

_WORKER = r"""
import sys
pid, nproc, port, here, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
import jax
if nproc > 1:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"localhost:{port}", num_processes=nproc, process_id=pid)
sys.path.insert(0, here)
import training_helpers as F
from phatgoose_jax import adapters
from phatgoose_jax.training import Trainer, adamw_optimizer, create_mesh, logical_axis_rules
from phatgoose_jax.training import state as S
_, model, variables = F.make_model("lora")
rules = logical_axis_rules(parameter_partitioning_dims=2)
trainer = Trainer(model, adapters.trainable_mask(variables["adapters"], "lora"),
                  adamw_optimizer(learning_rate=5e-2, total_steps=20, warmup_steps=2),
                  create_mesh(1), rules)
state = trainer.create_state(variables)
specs = {k: tuple(v.sharding.spec) for k, v in S.flatten(state["trainable"]).items()}
assert any(s and s[0] == "data" for s in specs.values()), specs  # really sharded across hosts
rows = 4 // nproc

def batches():
  i = 0
  while True:
    b = F.random_batch(i, batch_size=4)
    yield {k: v[pid * rows:(pid + 1) * rows] for k, v in b.items()}
    i += 1
val = lambda: [{k: v[pid * rows:(pid + 1) * rows] for k, v in F.random_batch(99, 4).items()}]
trainer.fit(state, batches(), 2, model_dir=out, checkpoint_every=2, progress=False,
            handle_signals=False, base_fingerprint="sha256:x", async_checkpoints=False,
            eval_iter_fn=val, eval_every=2, best_metric="loss", best_mode="min")
print("DONE", pid, flush=True)
"""


def _run(tmp_path, nproc: int, out: str):
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  script = tmp_path / "worker.py"
  script.write_text(_WORKER)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={4 // nproc}")
  procs = [subprocess.Popen([sys.executable, str(script), str(i), str(nproc), str(port), HERE,
                             out], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for i in range(nproc)]
  for p in procs:
    try:
      _, err = p.communicate(timeout=300)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail("a host hung while exporting host-sharded adapters")
    assert p.returncode == 0, err[-3000:]


def test_adapters_sharded_across_hosts_export_like_one_host(tmp_path):
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  _run(tmp_path, 2, str(tmp_path / "two_hosts"))
  _run(tmp_path, 1, str(tmp_path / "one_host"))
  two = load_file(str(tmp_path / "two_hosts" / "export" / "lora.safetensors"))
  one = load_file(str(tmp_path / "one_host" / "export" / "lora.safetensors"))
  assert two.keys() == one.keys() and two
  for k in one:
    np.testing.assert_allclose(two[k], one[k], atol=1e-5, err_msg=k)
