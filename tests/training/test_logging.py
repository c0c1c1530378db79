"""MetricsLogger: JSONL records; a resumed run drops the records a killed run wrote past its
checkpoint (and a torn last line), so every step appears once."""
import json
import os

from phatgoose_jax.training import logging as logging_lib


def test_resume_drops_records_after_the_restored_step(tmp_path):
  path = os.path.join(tmp_path, logging_lib.METRICS_FILE)
  with open(path, "w") as f:
    for step in (1, 2, 3, 4):
      f.write(json.dumps({"step": step, "split": "train"}) + "\n")
    f.write('{"step": 5, "spl')  # killed mid-write
  log = logging_lib.MetricsLogger(str(tmp_path), 10, start_step=2, tensorboard=False,
                                  progress=False, truncate=True)
  log.write(3, "train", {"loss": 1.5, "bad": float("nan")})
  log.close()
  records = [json.loads(line) for line in open(path)]
  assert [r["step"] for r in records] == [1, 2, 3]
  assert records[-1]["loss"] == 1.5 and records[-1]["bad"] == "nan"
  fresh = logging_lib.MetricsLogger(str(tmp_path), 10, start_step=0, tensorboard=False,
                                    progress=False)  # a fresh start keeps (appends to) the file
  fresh.close()
  assert len(open(path).readlines()) == 3


def test_fresh_start_in_an_old_model_dir_drops_old_steps_and_torn_lines(tmp_path):
  """A run killed before its first checkpoint restarts at step 0: its old records go (except
  step 0 ones, e.g. data statistics), and nothing is appended onto a torn line."""
  path = os.path.join(tmp_path, logging_lib.METRICS_FILE)
  with open(path, "w") as f:
    f.write(json.dumps({"step": 0, "split": "data"}) + "\n")
    f.write(json.dumps({"step": 1, "split": "train"}) + "\n")
    f.write('{"step": 2, "sp')
  other = logging_lib.MetricsLogger(str(tmp_path), 10, tensorboard=False, progress=False)
  other.close()  # not the training loop: only the torn line goes
  assert [json.loads(l)["step"] for l in open(path)] == [0, 1]
  log = logging_lib.MetricsLogger(str(tmp_path), 10, start_step=0, tensorboard=False,
                                  progress=False, truncate=True)
  log.write(1, "train", {"loss": 2.0})
  log.close()
  assert [(r["step"], r["split"]) for r in map(json.loads, open(path))] == [(0, "data"),
                                                                             (1, "train")]
