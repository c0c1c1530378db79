"""scripts/bench_routing.py runs end to end at tiny sizes and writes well-formed JSON records.

Speed is not asserted (the CI machine is shared); only the schema and that every ratio is a
positive finite number.
"""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "bench_routing.py")


def _run(tmp_path, *args):
  out = tmp_path / "bench.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, SCRIPT, "--smoke", "--json", str(out), *args],
                        env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  env_record = json.loads((tmp_path / "bench.json.env.json").read_text())
  assert env_record["stat"] in ("min", "median") and env_record["malloc"] in ("heap", "system")
  return json.loads(out.read_text()), proc


def test_smoke_json_schema(tmp_path):
  records, _ = _run(tmp_path, "--parts", "site,forward,official,scaling", "--malloc", "system",
                    "--stat", "median")
  assert isinstance(records, list) and records
  for rec in records:
    assert isinstance(rec["benchmark"], str) and rec["benchmark"]
    assert isinstance(rec["backend"], str) and rec["backend"]
    assert isinstance(rec["experts"], int) and rec["experts"] >= 1
    assert isinstance(rec["tokens"], int) and rec["tokens"] >= 0
    assert isinstance(rec["dims"], list) and len(rec["dims"]) == 2
    assert all(isinstance(d, int) and d > 0 for d in rec["dims"])
    assert isinstance(rec["ratio"], float) and math.isfinite(rec["ratio"]) and rec["ratio"] > 0
  kinds = {r["benchmark"] for r in records}
  for needed in ("site", "forward", "official_vs_ours", "site_official_vs_ours",
                 "library_bytes_8_vs_1", "scaling_experts", "scaling_growth"):
    assert needed in kinds, (needed, sorted(kinds))
  # Every site backend is measured next to its flop floor (> 1 by construction).
  site = [r for r in records if r["benchmark"] == "site"]
  assert {r["backend"] for r in site} >= {"dense", "sorted", "auto"}
  assert all(r["floor"] > 1.0 for r in site)
  # The 8-device subprocess really saw 8 devices and split the library evenly (E=8 divides).
  lib = next(r for r in records if r["benchmark"] == "library_bytes_8_vs_1")
  assert lib["devices"] == 8
  assert lib["ratio"] == pytest.approx(1 / 8, rel=0.05)


def test_unknown_part_is_a_clear_error(tmp_path):
  proc = subprocess.run([sys.executable, SCRIPT, "--smoke", "--parts", "site,nope"],
                        capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode != 0
  assert "--parts" in proc.stderr and "nope" in proc.stderr


def test_trace_routing_smoke_reports_every_site_and_times_the_encoder(tmp_path):
  script = os.path.join(ROOT, "scripts", "trace_routing.py")
  proc = subprocess.run([sys.executable, script, "--smoke", "--experts", "3", "--time",
                         "--layers", "0", "--repeats", "1", "--malloc", "system"],
                        env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  sites = [l for l in lines if l.startswith("  ") and " T=" in l]
  timed = [l for l in lines if l.startswith("  time ")]
  # tiny model: 1 encoder layer (7 sites) + 1 decoder layer (11 sites incl. cross k/v)
  assert len(sites) == 18 and len(timed) == 7
  assert all("sorted_cg=" in l and "chunked_gather=" in l for l in timed)


def test_trace_routing_stats():
  sys.path.insert(0, os.path.join(ROOT, "scripts"))
  try:
    import trace_routing  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.pop(0)
  idx = np.array([[0, 1], [0, 2], [0, 1], [3, 0]])
  s = trace_routing.stats(idx, 5)
  assert s == {"tokens": 4, "max_rows": 4, "mean_rows": 8 / 5, "used": 4, "top8_share": 1.0}
