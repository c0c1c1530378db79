"""The embedded demo end to end at the reduced (--quick) size, plus its pure helpers."""
import io
import json
import os
import random
import re
import sys

import numpy as np
import pytest

from phatgoose_jax import demo, demo_base, demo_methods
from phatgoose_jax.data import synthetic


MULTITASK_ROWS = ["Poly (mean Z)", "Poly-mu", "Poly-z (3-shot)", "MHR (mean Z)", "MHR-mu",
                  "MHR-z (3-shot)", "Task-level MoE (unlabelled inputs)"]


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
  expected = (["Base model", "Multitask LoRA"] + MULTITASK_ROWS + experts +
              [demo_methods.ORACLE, demo_methods.BEST_INDIVIDUAL, "Merged experts (uniform)",
               "TIES merge", "Retrieval", "Average Activation", "Arrow", "LoraHub (3-shot)",
               "DFWE (3-shot)", "PHATGOOSE"])
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
  # In-distribution context table: every zero-shot method on every expert task; the few-shot rows
  # are adapted per held-out task, so they have no context row.
  assert results["context"]["tasks"] == list(synthetic.SYNTHETIC_EXPERT_TASKS)
  few_shot = [m for m in expected if "-shot)" in m]
  assert few_shot == ["Poly-z (3-shot)", "MHR-z (3-shot)", "LoraHub (3-shot)", "DFWE (3-shot)"]
  assert results["context"]["methods"] == [m for m in expected if m not in few_shot and m not in (
      demo_methods.ORACLE, demo_methods.BEST_INDIVIDUAL)]
  for m in results["context"]["methods"]:
    for t in results["context"]["tasks"]:
      assert 0.0 <= results["context"]["table"][m][t] <= 100.0, (m, t)
  # Every new row has a note, and the trained baselines logged finite losses.
  assert set(results["method_notes"]) >= set(MULTITASK_ROWS + ["DFWE (3-shot)"])
  training = results["method_training"]
  assert set(training) == {"Poly", "MHR", "Task-level MoE", "DFWE"}
  for name in ("Poly", "MHR", "Task-level MoE"):
    assert np.isfinite(training[name]["final_train_loss"]), name
    assert np.isfinite(training[name]["validation_loss"]), name
  assert training["MHR"]["heads"] == demo.quick_config().mhr_heads and training["Poly"]["heads"] == 1
  for weights in training["DFWE"]["weights"].values():  # simplex weights per held-out task
    assert len(weights) == 6 and min(weights) >= 0 and sum(weights) == pytest.approx(1, abs=1e-3)
  routes = training["Task-level MoE"]["routes"]
  assert set(routes) == set(synthetic.SYNTHETIC_EXPERT_TASKS) | set(tasks)
  assert training["Task-level MoE"]["stage2_steps"] == demo.quick_config().task_moe_stage2_steps > 0
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
  a = demo_base.pretraining_examples(corpus, random.Random("s"))
  b = demo_base.pretraining_examples(corpus, random.Random("s"))
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


# ------------------------------------------------------------------------------------------------
# demo_multitask_methods: the evaluation shortcuts are exact.
# ------------------------------------------------------------------------------------------------
def _tiny():
  import dataclasses
  import jax
  cfg = dataclasses.replace(demo.quick_config(), vocab_size=32, emb_dim=16, num_heads=2,
                            head_dim=4, mlp_dim=24, rank=5, poly_rank=3, poly_skills=4)
  t5 = demo.t5_config(cfg)
  from phatgoose_jax.models import Transformer
  plain = Transformer(t5)
  rng = np.random.default_rng(0)
  tokens = [rng.integers(2, 32, (3, 7)).astype(np.int32), rng.integers(2, 32, (3, 5)).astype(
      np.int32)]
  params = plain.init({"params": jax.random.key(0)}, tokens[0], tokens[1], tokens[1],
                      enable_dropout=False)["params"]
  ctx = demo_methods.MethodContext(cfg=cfg, t5_config=t5, params=jax.device_get(params),
                                   vocab=None, library=None, run_dir="", experts=["a", "b"],
                                   train_data={}, progress=None)
  return ctx, tokens


def _logits(model, variables, tokens, **site_inputs):
  return np.asarray(model.apply(variables, tokens[0], tokens[1], tokens[1], enable_dropout=False,
                                site_inputs=site_inputs or None))


def test_task_moe_routed_params_equal_the_routed_model():
  import jax
  from phatgoose_jax import demo_multitask_methods as dmm
  from phatgoose_jax.methods import task_moe
  from phatgoose_jax.models import Transformer
  ctx, tokens = _tiny()
  t5 = ctx.t5_config
  mcfg = task_moe.TaskMoEConfig(num_experts=3)
  model = Transformer(t5, task_moe.make_task_moe_site_factory(mcfg))
  one_hot = {"encoder": np.eye(3, dtype=np.float32)[[2]], "decoder": np.eye(3, dtype=np.float32)[[1]]}
  batch_routes = {k: np.repeat(v[None], 3, 0) for k, v in one_hot.items()}  # [B, n, m]
  init = model.init({"params": jax.random.key(1)}, tokens[0], tokens[1], tokens[1],
                    enable_dropout=False, site_inputs={"layer_routes": batch_routes})
  rng = np.random.default_rng(1)
  adapters = jax.tree.map(lambda x: np.asarray(x) + rng.normal(0, 0.3, x.shape).astype(np.float32),
                          jax.device_get(init["adapters"]))  # distinct copies
  expected = _logits(model, {"params": ctx.params, "adapters": adapters}, tokens,
                     layer_routes=batch_routes)
  params = dmm._routed_params(ctx.params, adapters, one_hot)
  got = _logits(Transformer(t5), {"params": params}, tokens)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
  other = dmm._routed_params(ctx.params, adapters, {"encoder": one_hot["encoder"],
                                                     "decoder": np.eye(3, dtype=np.float32)[[0]]})
  assert np.abs(_logits(Transformer(t5), {"params": other}, tokens) - expected).max() > 1e-3
  # soft routes (stage 2's softmax): the plain model with mixed kernels is the routed model too
  soft = {"encoder": np.asarray([[0.2, 0.5, 0.3]], np.float32),
          "decoder": np.asarray([[0.6, 0.1, 0.3]], np.float32)}
  soft_expected = _logits(model, {"params": ctx.params, "adapters": adapters}, tokens,
                          layer_routes={k: np.repeat(v[None], 3, 0) for k, v in soft.items()})
  soft_params = dmm._routed_params(ctx.params, adapters, soft)
  np.testing.assert_allclose(_logits(Transformer(t5), {"params": soft_params}, tokens),
                             soft_expected, rtol=1e-4, atol=1e-4)


def test_poly_mu_padded_lora_equals_uniform_routing_and_mean_row_is_used():
  import dataclasses
  import jax
  from phatgoose_jax import demo_multitask_methods as dmm
  from phatgoose_jax.library import lora_from_adapters_tree
  from phatgoose_jax.methods import polytropon as poly
  from phatgoose_jax.models import Transformer
  ctx, tokens = _tiny()
  pcfg = poly.PolytroponConfig(num_tasks=2, num_skills=4, num_heads=2, rank=3)
  model = Transformer(ctx.t5_config, poly.make_poly_site_factory(pcfg))
  ids = np.zeros((3,), np.int32)
  init = model.init({"params": jax.random.key(2)}, tokens[0], tokens[1], tokens[1],
                    enable_dropout=False, site_inputs={"task_ids": ids})
  rng = np.random.default_rng(2)
  adapters = jax.tree.map(lambda x: rng.normal(0, 0.5, x.shape).astype(np.float32),
                          jax.device_get(init["adapters"]))  # nonzero skills_b and Z
  uniform = Transformer(ctx.t5_config, poly.make_poly_site_factory(
      dataclasses.replace(pcfg, routing="uniform")))
  expected = _logits(uniform, {"params": ctx.params, "adapters": adapters}, tokens)
  merged, _ = lora_from_adapters_tree(poly.merge_skills(adapters))
  got = _logits(demo_methods.lora_model(ctx), dmm._padded_lora(ctx, merged, 3), tokens)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
  # The mean-Z row (id 2) routes differently from task 0's own row.
  grown = {"params": ctx.params, "adapters": poly.add_task_rows(adapters, 1, "mean")}
  mean_row = _logits(model, grown, tokens, task_ids=np.full((3,), 2, np.int32))
  own_row = _logits(model, grown, tokens, task_ids=ids)
  assert np.abs(mean_row - own_row).max() > 1e-4


def test_sample_batches_cover_the_union_each_epoch():
  from phatgoose_jax import demo_multitask_methods as dmm
  data = {"task_ids": np.arange(10, dtype=np.int32), "x": np.arange(10) * 2}
  batches = list(dmm.sample_batches(data, 4, 5, seed=0))
  assert len(batches) == 5 and all(len(b["task_ids"]) == 4 for b in batches)
  assert all(np.array_equal(b["x"], b["task_ids"] * 2) for b in batches)  # rows stay aligned
  first = np.concatenate([b["task_ids"] for b in batches])[:10]
  assert sorted(first) == list(range(10))  # one full epoch before any repeat
  again = list(dmm.sample_batches(data, 4, 5, seed=0))
  assert all(np.array_equal(a["x"], b["x"]) for a, b in zip(batches, again))


def test_poly_rank_above_lora_rank_is_refused():
  import dataclasses
  from phatgoose_jax import demo_multitask_methods as dmm
  ctx, _ = _tiny()
  ctx.cfg = dataclasses.replace(ctx.cfg, poly_rank=ctx.cfg.rank + 1)
  with pytest.raises(demo.DemoError, match="poly_rank"):
    dmm.run_poly(ctx)


def test_demo_with_gin_flags_survives_its_lazy_imports(tmp_path):
  """`phatgoose-jax demo --gin_file=runs/demo.gin --gin.DemoConfig.expert_steps=600` finalizes
  gin and then imports the training, data, library and method modules (was: 'Attempted to add a
  new configurable after the config was locked')."""
  code = (
      "import argparse\n"
      "from phatgoose_jax import demo\n"
      "seen = {}\n"
      "def fake_run(output_dir, seed, quick, config):\n"
      "  import phatgoose_jax.training, phatgoose_jax.demo_methods  # noqa: F401\n"
      "  import phatgoose_jax.demo_multitask_methods, phatgoose_jax.library  # noqa: F401\n"
      "  from phatgoose_jax.data import sources, synthetic  # noqa: F401\n"
      "  seen['steps'] = config.expert_steps\n"
      "demo.run_demo = fake_run\n"
      f"args = argparse.Namespace(output_dir={str(tmp_path)!r}, seed=0, quick=False)\n"
      "demo.run_from_args(args, ['--gin_file=runs/demo.gin', '--gin.DemoConfig.expert_steps=600'])\n"
      "print('STEPS', seen['steps'])\n")
  import subprocess  # pylint: disable=g-import-not-at-top
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "STEPS 600" in proc.stdout
