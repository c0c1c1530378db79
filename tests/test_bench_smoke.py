"""scripts/bench_routing.py runs end to end at tiny sizes and writes well-formed JSON records.

Speed is not asserted (the CI machine is shared); only the schema and that every ratio is a
positive finite number.
"""
import json
import math
import os
import subprocess
import sys

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
