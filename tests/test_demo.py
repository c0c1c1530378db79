"""The embedded demo end to end at the reduced (--quick) size, plus its pure helpers."""
import io
import json
import os
import random
import re

import numpy as np
import pytest

from phatgoose_jax import demo, demo_methods
from phatgoose_jax.data import synthetic


def _parse_markdown_table(text):
  """The first markdown table in ``text``: (header cells, {row label: cells})."""
  lines = [l for l in text.splitlines() if l.startswith("| ")]
  header = [c.strip() for c in lines[0].strip("|").split("|")]
  rows = {}
  for line in lines[2:]:
    cells = [c.strip() for c in line.strip("|").split("|")]
    rows[cells[0]] = cells[1:]
  return header, rows


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("demo") / "run"
  stream = io.StringIO()
  report = demo.run_demo(str(out), seed=3, quick=True, stream=stream)
  return out, stream.getvalue(), report


def test_quick_demo_writes_report_results_and_heatmap(quick_run):
  out, printed, report = quick_run
  for name in ("report.md", "results.json", "routing_heatmap.png"):
    assert (out / name).is_file(), name
  # Progress: one line per stage with elapsed seconds.
  assert re.search(r"^\[demo +\d+\.\ds\] stage: pretrain base model$", printed, re.M)
  assert re.search(r"^\[demo +\d+\.\ds\] stage: method phatgoose$", printed, re.M)
  with open(out / "routing_heatmap.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  from matplotlib import image
  pixels = image.imread(str(out / "routing_heatmap.png"))
  assert pixels.ndim == 3 and pixels.shape[0] > 50 and pixels.shape[1] > 50
  assert report["paths"]["results"] == str(out / "results.json")


def test_results_have_every_method_with_numeric_heldout_metrics(quick_run):
  out, _, _ = quick_run
  results = json.loads((out / "results.json").read_text())
  assert results["skipped_methods"] == {}
  experts = [f"Expert: {t}" for t in synthetic.SYNTHETIC_EXPERT_TASKS]
  expected = (["Base model", "Multitask LoRA"] + experts +
              [demo_methods.ORACLE, demo_methods.BEST_INDIVIDUAL, "Merged experts (uniform)",
               "TIES merge", "Retrieval", "Average Activation", "Arrow", "LoraHub (3-shot)",
               "PHATGOOSE"])
  assert results["methods"] == expected
  tasks = list(synthetic.SYNTHETIC_HELDOUT_TASKS)
  assert results["tasks"] == tasks
  assert results["metric"] == {"compose2_gen": "exact_match", "compose2_choice": "accuracy",
                               "compose3_gen": "exact_match"}
  for m in expected:
    for t in tasks + ["average"]:
      value = results["table"][m][t]
      assert isinstance(value, float) and 0.0 <= value <= 100.0, (m, t, value)
    assert results["table"][m]["average"] == pytest.approx(
        np.mean([results["table"][m][t] for t in tasks]))
  # Rank classification over 4 choices has a granularity of 1/N; exact match of 1/N too.
  n = results["config"]["eval_examples"]
  for row in results["rows"]:
    assert row["num_examples"] == n
    assert row["score"] * n / 100 == pytest.approx(round(row["score"] * n / 100), abs=1e-6)
  # The derived rows come from the single-expert rows.
  for t in tasks:
    assert results["table"][demo_methods.ORACLE][t] == max(results["table"][e][t] for e in experts)
  best = "Expert: " + results["best_individual"]
  assert all(results["table"][demo_methods.BEST_INDIVIDUAL][t] == results["table"][best][t]
             for t in tasks)
  # In-distribution context table: every method evaluated on every expert task (not LoraHub).
  assert results["context"]["tasks"] == list(synthetic.SYNTHETIC_EXPERT_TASKS)
  assert "LoraHub (3-shot)" not in results["context"]["methods"]
  assert "PHATGOOSE" in results["context"]["methods"]
  # Bookkeeping.
  assert results["seed"] == 3 and results["quick"] is True
  assert results["timings_s"]["total"] > 0 and results["cpu_time_s"] > 0
  assert {"jax", "flax", "python"} <= set(results["versions"])
  assert results["expert_names"] == list(synthetic.SYNTHETIC_EXPERT_TASKS)
  routing = results["routing"]
  assert 0.0 <= routing["segment_agreement_percent"] <= 100.0
  assert routing["heatmap_tokens"][-1] == "</s>"


def test_printed_table_matches_results_json(quick_run):
  out, printed, report = quick_run
  results = json.loads((out / "results.json").read_text())
  header, rows = _parse_markdown_table(printed[printed.index("| method |"):])
  assert header == ["method"] + results["tasks"] + ["average"]
  assert list(rows) == results["methods"]
  for m, cells in rows.items():
    expected = [f"{results['table'][m][c]:.1f}" for c in header[1:]]
    assert cells == expected, m
  md = (out / "report.md").read_text()
  assert report["table_markdown"] in md and report["table_markdown"] in printed


def test_library_of_the_run_holds_gated_experts(quick_run):
  from phatgoose_jax.library import ExpertLibrary
  out, _, _ = quick_run
  lib = ExpertLibrary.open(str(out / "library"))
  assert lib.names() == list(synthetic.SYNTHETIC_EXPERT_TASKS)
  assert lib.check() == []
  e = lib.load("sort_digits")
  assert "gate" in e.vectors and e.rank == demo.quick_config().rank
  gate = next(iter(e.vectors["gate"].values()))
  assert np.any(gate != 0)  # trained from a zero init


def test_pretraining_examples_are_deterministic_and_well_formed():
  corpus = synthetic.synthetic_corpus(50, 0)
  a = demo.pretraining_examples(corpus, random.Random("s"))
  b = demo.pretraining_examples(corpus, random.Random("s"))
  assert a == b and len(a) == len(corpus)
  for line, ex in zip(corpus, a):
    assert ex["inputs"] and ex["targets"]
    if ex["targets"] == line:  # denoising: inputs are a subsequence of the line
      words = iter(line.split())
      assert all(w in words for w in ex["inputs"].split())
    else:  # prefix LM
      assert f"{ex['inputs']} {ex['targets']}" == line


def test_add_derived_rows():
  rows = []
  scores = {"Expert: a": (10.0, 50.0), "Expert: b": (30.0, 20.0), "Expert: c": (20.0, 45.0)}
  for m, (s1, s2) in scores.items():
    rows += [{"method": m, "task": "t1", "score": s1}, {"method": m, "task": "t2", "score": s2}]
  rows.append({"method": "PHATGOOSE", "task": "t1", "score": 1.0})
  out = demo_methods.add_derived_rows(rows, list(scores))
  oracle = {r["task"]: (r["score"], r["chosen"]) for r in out if r["method"] == demo_methods.ORACLE}
  assert oracle == {"t1": (30.0, "b"), "t2": (50.0, "a")}
  best = {r["task"]: r["score"] for r in out if r["method"] == demo_methods.BEST_INDIVIDUAL}
  assert best == {"t1": 20.0, "t2": 45.0}  # c has the best mean (32.5; a 30, b 25)
  assert out[-1]["method"] == "PHATGOOSE"  # derived rows sit right after the experts


def test_bad_seed_and_output_dir(tmp_path):
  with pytest.raises(demo.DemoError, match="--seed"):
    demo.run_demo(str(tmp_path / "x"), seed=-1, quick=True)
  blocker = tmp_path / "file"
  blocker.write_text("")
  with pytest.raises(demo.DemoError, match="--output_dir"):
    demo.run_demo(str(blocker), quick=True)


def test_demo_gin_file_matches_defaults():
  """gin/runs/demo.gin documents the defaults: parsing it must give DemoConfig()."""
  import gin
  from phatgoose_jax import gin_utils
  try:
    gin_utils.parse_gin(["runs/demo.gin"], finalize=False)
    with gin.unlock_config():
      parsed = demo.DemoConfig()
  finally:
    gin.clear_config()
  import dataclasses
  defaults = {f.name: f.default for f in dataclasses.fields(demo.DemoConfig)}
  assert dataclasses.asdict(parsed) == defaults
  # ... and the file binds every field but the seed (the --seed flag).
  text = open(os.path.join(gin_utils.REPO_GIN_DIR, "runs", "demo.gin")).read()
  bound = set(re.findall(r"^DemoConfig\.(\w+) =", text, re.M))
  assert bound == set(defaults) - {"seed"}


def test_module_entry_point(tmp_path):
  """`python -m phatgoose_jax.demo` (gin registration happens once) and its one-line errors."""
  import subprocess
  import sys
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "phatgoose_jax.demo", "--help"], env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert "--output_dir" in proc.stdout and "--quick" in proc.stdout
  proc = subprocess.run([sys.executable, "-m", "phatgoose_jax.demo", "--seed=-1",
                         f"--output_dir={tmp_path / 'x'}"], env=env, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      "phatgoose-jax: error: --seed must be a non-negative int, got -1"]
