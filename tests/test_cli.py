"""The ``phatgoose-jax`` console script: library management and one-line errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from phatgoose_jax import cli

TINY = os.path.join(os.path.dirname(__file__), "testdata", "hf_t5_1_1_tiny")
MODEL = os.path.join(TINY, "model")
ADAPTERS = os.path.join(TINY, "adapters")


def run_cli(capsys, *argv):
  code = cli.main(list(argv))
  out, err = capsys.readouterr()
  return code, out, err


def assert_one_line_error(code, err, *needles):
  assert code == 2, err
  lines = err.strip().splitlines()
  assert len(lines) == 1, err
  assert lines[0].startswith("phatgoose-jax: error: "), err
  assert "Traceback" not in err
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])


def test_library_create_add_list_remove_peft(tmp_path, capsys):
  lib = str(tmp_path / "lib")
  code, out, err = run_cli(capsys, "library", "create", lib, "--base", MODEL)
  assert code == 0, err
  assert "sha256:" in out
  for task in ("task_a", "task_b", "task_c"):
    code, out, err = run_cli(capsys, "library", "add", lib, task, "--peft",
                             os.path.join(ADAPTERS, task), "--task", task)
    assert code == 0, err
    assert f"added {task}" in out
  code, out, _ = run_cli(capsys, "library", "list", lib, "--json")
  entries = json.loads(out)
  assert [e["name"] for e in entries] == ["task_a", "task_b", "task_c"]
  assert [e["task"] for e in entries] == ["task_a", "task_b", "task_c"]
  assert all(e["provenance"]["import_kind"] == "hf_peft" for e in entries)

  code, out, err = run_cli(capsys, "library", "remove", lib, "task_b")
  assert code == 0, err
  code, out, _ = run_cli(capsys, "library", "list", lib)
  assert code == 0
  assert "task_a" in out and "task_c" in out and "task_b" not in out
  assert "2 experts" in out

  code, out, _ = run_cli(capsys, "library", "info", lib, "--check")
  info = json.loads(out)
  assert code == 0 and info["experts"] == ["task_a", "task_c"] and info["problems"] == []
  # The library's fingerprint is the base model's.
  from phatgoose_jax import checkpoints
  _, params = checkpoints.load_checkpoint(MODEL)
  assert info["base_fingerprint"] == checkpoints.params_fingerprint(params)


def test_library_vectors_arrow_stores_the_prototypes(tmp_path, capsys):
  """`library vectors LIB arrow` stores what routers/arrow*.gin read (before: Python only)."""
  from phatgoose_jax.library import ExpertLibrary
  from phatgoose_jax.methods import arrow
  lib = str(tmp_path / "lib")
  assert run_cli(capsys, "library", "create", lib, "--base", MODEL)[0] == 0
  for task in ("task_a", "task_b"):
    assert run_cli(capsys, "library", "add", lib, task, "--peft",
                   os.path.join(ADAPTERS, task))[0] == 0
  code, out, err = run_cli(capsys, "library", "vectors", lib, "arrow", "--experts", "task_b")
  assert code == 0 and "of 1 expert(s)" in out, err
  opened = ExpertLibrary.open(lib)
  assert "arrow" in opened.metadata("task_b")["vectors"]
  assert "arrow" not in opened.metadata("task_a").get("vectors", [])
  code, out, err = run_cli(capsys, "library", "vectors", lib, "arrow")
  assert code == 0 and "of 1 expert(s)" in out  # task_b kept, task_a computed
  stacked = ExpertLibrary.open(lib).stack(["task_a"], vectors="arrow")
  want = arrow.expert_arrow_vectors(ExpertLibrary.open(lib).load("task_a").lora)
  for site, v in want.items():
    np.testing.assert_allclose(stacked[site]["gates"][0], v, rtol=1e-6)
  code, _, err = run_cli(capsys, "library", "vectors", lib, "arrow", "--experts", "nope")
  assert_one_line_error(code, err, "--experts", "nope")


def _write_export(model_dir, fingerprint, with_gate=True):
  from phatgoose_jax.checkpoints import load_checkpoint
  from phatgoose_jax.library import site_shapes, to_adapters_tree
  from phatgoose_jax.training import state as state_lib
  config, _ = load_checkpoint(MODEL)
  rng = np.random.default_rng(0)
  tree = {}
  for site, (d, f) in site_shapes(config).items():
    tree[site] = {"lora_a": rng.normal(size=(d, 3)).astype(np.float32),
                  "lora_b": rng.normal(size=(3, f)).astype(np.float32)}
    if with_gate:
      tree[site]["gate"] = rng.normal(size=(d,)).astype(np.float32)
  state_lib.export_adapters(str(model_dir), to_adapters_tree(tree),
                            {"task": "my_task", "scale": 1 / 3, "mode": "gated_lora",
                             "base_fingerprint": fingerprint})
  return tree


def test_library_add_training_export_keeps_gates(tmp_path, capsys):
  from phatgoose_jax import checkpoints
  from phatgoose_jax.library import ExpertLibrary
  _, params = checkpoints.load_checkpoint(MODEL)
  fingerprint = checkpoints.params_fingerprint(params)
  tree = _write_export(tmp_path / "run", fingerprint)
  lib = str(tmp_path / "lib")
  assert run_cli(capsys, "library", "create", lib, "--base", MODEL)[0] == 0
  code, out, err = run_cli(capsys, "library", "add", lib, "gated", str(tmp_path / "run"))
  assert code == 0, err
  expert = ExpertLibrary.open(lib).load("gated")
  assert expert.task == "my_task" and expert.rank == 3
  assert expert.scale == pytest.approx(1 / 3)
  site = next(iter(tree))
  np.testing.assert_array_equal(expert.lora[site]["lora_a"], tree[site]["lora_a"])
  np.testing.assert_array_equal(expert.vectors["gate"][site], tree[site]["gate"])

  # An export trained on another base model is refused, naming the field.
  _write_export(tmp_path / "other", "sha256:" + "0" * 64)
  code, _, err = run_cli(capsys, "library", "add", lib, "other", str(tmp_path / "other"))
  assert_one_line_error(code, err, "base_fingerprint")
  # A duplicate name is refused unless --overwrite.
  code, _, err = run_cli(capsys, "library", "add", lib, "gated", str(tmp_path / "run"))
  assert_one_line_error(code, err, "gated")
  assert run_cli(capsys, "library", "add", lib, "gated", str(tmp_path / "run"),
                 "--overwrite")[0] == 0


@pytest.mark.parametrize("argv, needles", [
    (["library", "list", "/nonexistent/lib"], ["/nonexistent/lib"]),
    (["library", "add", "/nonexistent/lib", "x", "--peft", ADAPTERS], ["/nonexistent/lib"]),
    (["library", "create", "LIB", "--base", "/nonexistent/model"], ["/nonexistent/model"]),
    (["frobnicate"], ["frobnicate"]),
    (["library", "explode", "x"], ["explode"]),
    (["library", "remove"], ["library remove", "path"]),
    (["library", "list", "x", "--bogus"], ["--bogus"]),
    (["demo", "--seed", "abc"], ["--seed"]),
    (["demo", "--not_a_flag"], ["--not_a_flag"]),
    ([], ["COMMAND"]),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, argv, needles):
  argv = [str(tmp_path / "lib") if a == "LIB" else a for a in argv]
  code, _, err = run_cli(capsys, *argv)
  assert_one_line_error(code, err, *needles)


def test_library_errors_name_the_culprit(tmp_path, capsys):
  lib = str(tmp_path / "lib")
  assert run_cli(capsys, "library", "create", lib, "--base", MODEL)[0] == 0
  code, _, err = run_cli(capsys, "library", "remove", lib, "ghost")
  assert_one_line_error(code, err, "ghost")
  code, _, err = run_cli(capsys, "library", "add", lib, "x", "--peft", str(tmp_path / "nope"))
  assert_one_line_error(code, err, str(tmp_path / "nope"))
  code, _, err = run_cli(capsys, "library", "add", lib, "x")
  assert_one_line_error(code, err, "--peft")
  code, _, err = run_cli(capsys, "library", "create", lib, "--base", MODEL)
  assert_one_line_error(code, err, "already")


def test_train_expert_passes_gin_flags_and_reports_missing_macro(capsys):
  import gin
  try:
    code, _, err = run_cli(capsys, "train-expert", "--gin.MIXTURE_OR_TASK_NAME='x'")
  finally:
    gin.clear_config()
  # MIXTURE_OR_TASK_NAME was given, so the first unset required macro is another one.
  assert_one_line_error(code, err, "INITIAL_CHECKPOINT_PATH")
  try:
    code, _, err = run_cli(capsys, "train-gate", "--gin_file=runs/does_not_exist.gin")
  finally:
    gin.clear_config()
  assert_one_line_error(code, err, "does_not_exist.gin")


def test_console_entry_point_subprocess(tmp_path):
  """The real process: exit status 2, one stderr line, no traceback; --debug shows it."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-c", "import sys; from phatgoose_jax.cli import main; sys.exit(main())"]
  proc = subprocess.run(cmd + ["library", "list", str(tmp_path / "missing")], env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      f"phatgoose-jax: error: expert library {tmp_path / 'missing'} does not exist"]
  proc = subprocess.run(cmd + ["--debug", "library", "list", str(tmp_path / "missing")], env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0 and "Traceback" in proc.stderr


@pytest.mark.parametrize("argv, module", [(["train-expert", "--help"], "train"),
                                          (["eval", "-h"], "eval")])
def test_pass_through_commands_print_their_usage(argv, module, capsys):
  from phatgoose_jax import cli  # pylint: disable=g-import-not-at-top
  assert cli.run(argv) == 0
  out = capsys.readouterr().out
  assert f"python -m phatgoose_jax.{module}" in out and "--gin" in out


def test_train_errors_carry_no_gin_call_site_suffix(tmp_path, capsys):
  """An error raised inside the gin-called train() is one line without gin's
  "In call to configurable 'train' (<function train at 0x...>)"."""
  import gin
  try:
    code, _, err = run_cli(capsys, "train-expert", f"--gin.MODEL_DIR='{tmp_path}/m'",
                           "--gin.MIXTURE_OR_TASK_NAME='x'",
                           f"--gin.INITIAL_CHECKPOINT_PATH='{tmp_path}/nockpt'")
  finally:
    gin.clear_config()
  assert_one_line_error(code, err)
  assert "In call to configurable" not in err and "0x" not in err


def test_clean_message_keeps_one_gin_scope_of_a_run():
  from phatgoose_jax import errors
  e = ValueError("P3 source 'tfrecord' needs p3_dir in scope 'M' in scope 'M' in scope 'M'")
  assert errors.clean_message(e) == "P3 source 'tfrecord' needs p3_dir in scope 'M'"


def test_library_add_official_flag_errors(tmp_path, capsys, monkeypatch):
  lib = str(tmp_path / "lib")
  assert run_cli(capsys, "library", "create", lib, "--base", MODEL)[0] == 0
  code, _, err = run_cli(capsys, "library", "add", lib, "x", str(tmp_path), "--expert-index", "1")
  assert_one_line_error(code, err, "--expert-index needs --official")
  (tmp_path / "best.pt").write_bytes(b"not a checkpoint")
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
  code, _, err = run_cli(capsys, "library", "add", lib, "x", "--official",
                         str(tmp_path / "best.pt"))
  assert_one_line_error(code, err, "torch")


def test_library_vectors_average_activation_with_nothing_to_do_loads_nothing(tmp_path, capsys):
  """Every expert already has the vectors: no checkpoint is read (a bad path is not touched)."""
  from phatgoose_jax.library import ExpertLibrary
  lib = str(tmp_path / "lib")
  assert run_cli(capsys, "library", "create", lib, "--base", MODEL)[0] == 0
  assert run_cli(capsys, "library", "add", lib, "a", "--peft", os.path.join(ADAPTERS, "task_a"),
                 "--task", "t")[0] == 0
  opened = ExpertLibrary.open(lib)
  sites = opened.metadata("a")["sites"]
  shapes = opened.stack(["a"], vectors=None)
  opened.set_vectors("a", "average_activation",
                     {s: np.zeros(shapes[s]["lora_a"].shape[1], np.float32) for s in sites})
  code, out, err = run_cli(capsys, "library", "vectors", lib, "average_activation",
                           "--gin_file=runs/average_activation.gin",
                           "--gin.INITIAL_CHECKPOINT_PATH='/no/such/ckpt'",
                           "--gin.MIXTURE_OR_TASK_MODULE=None")
  assert code == 0, err
  assert "of 0 expert(s)" in out and "--overwrite recomputes" in out
