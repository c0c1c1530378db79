"""Every gin file in gin/runs parses (required macros supplied); config errors are one line."""
import glob
import os
import subprocess
import sys

import gin
import pytest

import phatgoose_jax.train  # noqa: F401  (registers the configurables)
from phatgoose_jax import gin_utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_FILES = sorted(glob.glob(os.path.join(REPO, "gin", "runs", "*.gin")))
TRAIN_RUN_FILES = [p for p in RUN_FILES
                   if os.path.basename(p) in ("train_expert.gin", "train_gate.gin",
                                              "multitask.gin")]
# Each run file has a parse/build test: the training ones here, eval.gin in
# tests/evaluation/test_eval_cli.py, demo.gin in tests/test_demo.py, average_activation.gin here
# (parse) and in tests/reliability/test_eval_routers.py (the job).
TESTED_ELSEWHERE = {"eval.gin", "demo.gin", "average_activation.gin"}
REQUIRED = ["MODEL_DIR='/tmp/m'", "MIXTURE_OR_TASK_NAME='t'", "INITIAL_CHECKPOINT_PATH='/tmp/c'",
            "EXPERT_PATH='/tmp/e'"]


@pytest.fixture(autouse=True)
def _clear_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def test_run_files_exist_and_each_has_a_parse_test():
  names = {os.path.basename(p) for p in RUN_FILES}
  assert names == {os.path.basename(p) for p in TRAIN_RUN_FILES} | TESTED_ELSEWHERE
  assert {"train_expert.gin", "train_gate.gin", "multitask.gin"} <= names


@pytest.mark.parametrize("path", TRAIN_RUN_FILES, ids=os.path.basename)
def test_run_file_parses_with_required_macros(path):
  rel = os.path.relpath(path, os.path.join(REPO, "gin"))
  bindings = [b for b in REQUIRED if not b.startswith("EXPERT_PATH") or "gate" in rel]
  gin_utils.parse_gin([rel], bindings, finalize=False)
  assert gin.query_parameter("phatgoose_jax.train.train.model_dir") is not None
  assert gin.query_parameter("%MODEL_DIR") == "/tmp/m"
  mode = gin.query_parameter("phatgoose_jax.train.train.mode")
  assert mode == ("gated_lora" if "gate" in rel else "lora")
  if "gate" in rel:
    assert gin.query_parameter("%TRAIN_STEPS") == 100
    assert gin.query_parameter("%EXPERT_PATH") == "/tmp/e"
  else:
    assert gin.query_parameter("%TRAIN_STEPS") == 1000


def test_missing_required_macro_is_named():
  with pytest.raises(gin_utils.GinConfigError, match="required gin macro MODEL_DIR"):
    gin_utils.parse_gin(["runs/train_expert.gin"], REQUIRED[1:3], finalize=False)


def test_unknown_binding_is_one_line_naming_it():
  with pytest.raises(gin_utils.GinConfigError) as err:
    gin_utils.parse_gin(["runs/train_expert.gin"], REQUIRED[:3] + ["no_such_fn.x = 1"],
                        finalize=False)
  assert "no_such_fn" in str(err.value) and "\n" not in str(err.value)


def test_split_flags_t5x_style():
  files, bindings, paths, rest = gin_utils.split_flags(
      ["--gin_file=a.gin", "--gin.MODEL_DIR='/x'", "--gin_search_paths=p,q", "--gin_file", "b.gin",
       "--gin_bindings=A=1", "--other"])
  assert files == ["a.gin", "b.gin"] and paths == ["p", "q"] and rest == ["--other"]
  assert bindings == ["MODEL_DIR='/x'", "A=1"]


def test_entry_point_exits_2_with_one_line_and_no_traceback(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  proc = subprocess.run(
      [sys.executable, "-m", "phatgoose_jax.train", "--gin_file=runs/train_expert.gin",
       "--gin.MIXTURE_OR_TASK_NAME='t'", "--gin.INITIAL_CHECKPOINT_PATH='/nonexistent'"],
      env=env, capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
  assert proc.returncode == 2, proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert lines[-1].startswith("error:") and "MODEL_DIR" in lines[-1]
  assert "Traceback" not in proc.stderr


def test_gate_run_refuses_an_expert_of_another_rank_scale_or_base():
  from phatgoose_jax import adapters as ad  # pylint: disable=g-import-not-at-top
  from phatgoose_jax import train as train_mod  # pylint: disable=g-import-not-at-top
  acfg = ad.AdapterConfig(rank=4)
  meta = {"rank": 4, "scale": 0.25, "base_fingerprint": "sha256:a"}
  train_mod._check_expert_matches(meta, "/e", acfg, "sha256:a")  # pylint: disable=protected-access
  train_mod._check_expert_matches({}, "/e", acfg, "sha256:b")  # fields absent: nothing to compare
  for field, value, flag in (("rank", 8, "LORA_RANK"), ("scale", 0.5, "AdapterConfig.scale"),
                             ("base_fingerprint", "sha256:z", "INITIAL_CHECKPOINT_PATH")):
    with pytest.raises(ValueError, match=f"expert's {field}.*{flag}"):
      train_mod._check_expert_matches(dict(meta, **{field: value}), "/e", acfg, "sha256:a")  # pylint: disable=protected-access


def test_gate_gin_validates_only_at_the_end_and_expert_gin_uses_the_official_batch():
  gin.clear_config()
  try:
    gin_utils.parse_gin(["runs/train_gate.gin"], REQUIRED + ["EXPERT_PATH='/e'"], finalize=False)
    assert gin.query_parameter("phatgoose_jax.train.train.validate_at_start") is False
    assert gin.query_parameter("phatgoose_jax.train.train.eval_every") is None
    assert gin.query_parameter("%BATCH_SIZE") == 1024
  finally:
    gin.clear_config()


def test_paths_and_periods_are_checked_before_any_work(tmp_path):
  from phatgoose_jax import train as train_mod  # pylint: disable=g-import-not-at-top
  check = train_mod._check_paths_and_periods  # pylint: disable=protected-access
  a_file = tmp_path / "f"
  a_file.write_text("x")
  check(str(tmp_path / "run"), "/ckpt", eval_every=None, log_every=10)
  for args, kw, match in (((str(a_file), "/c"), {}, "MODEL_DIR .* is not a directory"),
                          ((None, "/c"), {}, "MODEL_DIR must be"),
                          (("/m", None), {}, "INITIAL_CHECKPOINT_PATH must be"),
                          (("/m", "/c"), {"eval_every": "10"}, "train.eval_every"),
                          (("/m", "/c"), {"log_every": True}, "train.log_every")):
    with pytest.raises(ValueError, match=match):
      check(*args, **kw)


def test_run_main_turns_os_errors_and_ctrl_c_into_one_line(capsys):
  def raise_(exc):
    def main(argv):
      raise exc
    return main
  with pytest.raises(SystemExit) as e:
    gin_utils.run_main(raise_(PermissionError(13, "Permission denied", "/runs/x")), [])
  assert e.value.code == 2 and "Permission denied" in capsys.readouterr().err
  with pytest.raises(SystemExit) as e:
    gin_utils.run_main(raise_(KeyboardInterrupt()), [])
  assert e.value.code == 130 and "interrupted" in capsys.readouterr().err


def test_best_metric_without_mode_gets_the_direction_of_its_kind():
  from phatgoose_jax.train import best_selection  # pylint: disable=g-import-not-at-top
  assert best_selection("token", None, None) == ("loss", "min")
  assert best_selection("token", "accuracy", None) == ("accuracy", "max")
  assert best_selection("task", None, None) == ("average_score", "max")
  assert best_selection("task", "eval_loss", None) == ("eval_loss", "min")
  assert best_selection("token", "accuracy", "min") == ("accuracy", "min")


def test_help_prints_the_entry_points_usage(capsys):
  from phatgoose_jax import train as train_mod  # pylint: disable=g-import-not-at-top
  with pytest.raises(SystemExit) as e:
    gin_utils.run_main(train_mod.main, ["--help"])
  assert e.value.code == 0 and "python -m phatgoose_jax.train" in capsys.readouterr().out


def test_log_every_none_is_refused():
  from phatgoose_jax import train as train_mod  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="train.log_every must be a positive int, got None"):
    train_mod._check_paths_and_periods("/m", "/c", eval_every=None, log_every=None)  # pylint: disable=protected-access


def test_average_activation_run_file_parses():
  gin_utils.parse_gin(["models/t5_1_1_base.gin", "runs/average_activation.gin"],
                      ["LIBRARY_PATH='/lib'", "MIXTURE_OR_TASK_MODULE=None"], finalize=False)
  q = lambda p: gin.query_parameter(f"phatgoose_jax.methods.average_activation.{p}")
  assert str(q("build_library_vectors.checkpoint_path")) == "%CHECKPOINT_PATH"
  assert gin.query_parameter("%TASK_FEATURE_LENGTHS") == {"inputs": 512, "targets": 128}
  assert q("AverageActivationConfig.max_examples") == 1000


def test_average_activation_run_file_without_a_data_gin_names_the_macro():
  with pytest.raises(gin_utils.GinConfigError, match="MIXTURE_OR_TASK_MODULE is not defined"):
    gin_utils.parse_gin(["models/t5_1_1_base.gin", "runs/average_activation.gin"],
                        ["LIBRARY_PATH='/lib'"], finalize=False)
