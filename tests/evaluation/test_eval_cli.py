"""gin/runs/eval.gin and the router files parse; the entry point fails with one-line errors."""
import pathlib

import gin
import pytest

from phatgoose_jax import eval as eval_lib
from phatgoose_jax.adapters import AdapterConfig

GIN_DIR = pathlib.Path(__file__).parent.parent.parent / "gin"
ROUTERS = ["phatgoose", "arrow", "arrow_phatgoose", "average_activation", "uniform_merge",
           "single_expert"]


@pytest.mark.parametrize("router", ROUTERS)
def test_eval_gin_parses_with_router(router):
  gin.clear_config()
  try:
    gin.add_config_file_search_path(str(GIN_DIR))
    gin.parse_config_files_and_bindings(
        [str(GIN_DIR / "models" / "tiny.gin"), str(GIN_DIR / "runs" / "eval.gin"),
         str(GIN_DIR / "routers" / f"{router}.gin")],
        ["INITIAL_CHECKPOINT_PATH = '/ckpt'", "MIXTURE_OR_TASK_NAME = 'mix'",
         "EVAL_OUTPUT_DIR = '/out'", "EXPERT_NAME = 'e0'"], finalize_config=True)
    q = lambda p: gin.query_parameter(f"phatgoose_jax.eval.evaluate.{p}")
    assert str(q("task_feature_lengths")) == "%TASK_FEATURE_LENGTHS"
    assert gin.query_parameter("%TASK_FEATURE_LENGTHS") == {"inputs": 512, "targets": 128}
    assert gin.query_parameter("%INITIAL_CHECKPOINT_PATH") == "/ckpt"
    assert q("method_name") == router
    cfg = AdapterConfig(num_experts=5)  # as eval.py builds it from the library
    assert cfg.mode == "routed"
    want = {"phatgoose": "phatgoose", "arrow": "arrow", "arrow_phatgoose": "arrow_phatgoose",
            "average_activation": "average_activation",
            "uniform_merge": "uniform", "single_expert": "uniform"}[router]
    assert cfg.router == want
  finally:
    gin.clear_config()


def test_missing_required_macro_is_one_line_exit_2(capsys):
  gin.clear_config()
  try:
    code = eval_lib.main(["--gin_file=models/tiny.gin", "--gin_file=runs/eval.gin",
                          "--gin.INITIAL_CHECKPOINT_PATH='/nonexistent'",
                          "--gin.EVAL_OUTPUT_DIR='/tmp/x'"])
  finally:
    gin.clear_config()
  err = capsys.readouterr().err
  assert code == 2
  assert err.count("\n") == 1 and "Traceback" not in err
  assert "MIXTURE_OR_TASK_NAME" in err


def test_checkpoint_path_defaults_to_the_preset_and_can_be_overridden(monkeypatch, tmp_path):
  """runs/eval.gin evaluates CHECKPOINT_PATH (t5x's eval macro), by default the preset's
  INITIAL_CHECKPOINT_PATH, also when that is overridden after eval.gin."""
  import phatgoose_jax  # pylint: disable=g-import-not-at-top
  from phatgoose_jax.data import registry  # pylint: disable=g-import-not-at-top

  class Loaded(Exception):
    pass
  loaded = []

  def fake_load(path, config=None):
    loaded.append(path)
    raise Loaded()
  monkeypatch.setattr(phatgoose_jax, "load_checkpoint", fake_load)
  monkeypatch.setattr(registry, "get_task_or_mixture", lambda name: None)
  files = [str(GIN_DIR / "models" / "t5_1_1_base.gin"), str(GIN_DIR / "runs" / "eval.gin"),
           str(GIN_DIR / "routers" / "phatgoose.gin")]
  required = ["MIXTURE_OR_TASK_NAME = 'mix'", f"EVAL_OUTPUT_DIR = '{tmp_path}/out'"]
  cases = [([], "gs://t5-data/pretrained_models/t5x/t5_1_1_base/checkpoint_1000000"),
           (["INITIAL_CHECKPOINT_PATH = '/pre'"], "/pre"),
           (["CHECKPOINT_PATH = '/finetuned'"], "/finetuned")]
  for extra, want in cases:
    gin.clear_config()
    try:
      gin.parse_config_files_and_bindings(files, required + extra, finalize_config=True)
      with pytest.raises(Loaded):
        eval_lib.evaluate()  # pylint: disable=no-value-for-parameter
      assert loaded[-1] == want
    finally:
      gin.clear_config()


def test_undefined_checkpoint_macro_is_one_line_exit_2(capsys):
  """tiny.gin defines no INITIAL_CHECKPOINT_PATH: the error names the macro (was gin's
  'macro() missing 1 required positional argument')."""
  gin.clear_config()
  try:
    code = eval_lib.main(["--gin_file=models/tiny.gin", "--gin_file=runs/eval.gin",
                          "--gin.MIXTURE_OR_TASK_NAME='x'", "--gin.EVAL_OUTPUT_DIR='/tmp/x'"])
  finally:
    gin.clear_config()
  err = capsys.readouterr().err
  assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
  assert "gin macro INITIAL_CHECKPOINT_PATH is not defined" in err
  assert "positional argument" not in err


def test_unknown_flag_and_no_gin_file(capsys):
  assert eval_lib.main(["--bogus=1", "--gin_file=runs/eval.gin"]) == 2
  assert "unknown flag '--bogus=1'" in capsys.readouterr().err
  assert eval_lib.main([]) == 2
  assert "no --gin_file" in capsys.readouterr().err


def test_headline_metric_is_accuracy_then_rouge_l():
  from phatgoose_jax import eval as eval_mod  # pylint: disable=g-import-not-at-top
  assert eval_mod._headline_metric({"rouge1": 0.5, "rouge2": 0.2, "rougeL": 0.4}) == "rougeL"  # pylint: disable=protected-access
  assert eval_mod._headline_metric({"accuracy": 50.0, "rougeL": 0.4}) == "accuracy"  # pylint: disable=protected-access
  assert eval_mod._headline_metric({"f1": 1.0, "bleu": 2.0}) == "bleu"  # pylint: disable=protected-access


def test_eval_output_dir_is_checked_before_the_evaluation(tmp_path):
  a_file = tmp_path / "f"
  a_file.write_text("x")
  lengths = {"inputs": 4, "targets": 4}
  with pytest.raises(eval_lib.EvalConfigError, match="EVAL_OUTPUT_DIR .* not a directory"):
    eval_lib.evaluate(mixture_or_task_name="x", task_feature_lengths=lengths,
                      initial_checkpoint_path="/nonexistent", eval_output_dir=str(a_file))
  with pytest.raises(eval_lib.EvalConfigError, match="cannot be written"):
    eval_lib.evaluate(mixture_or_task_name="x", task_feature_lengths=lengths,
                      initial_checkpoint_path="/nonexistent",
                      eval_output_dir=str(a_file / "sub" / "out"))


@pytest.mark.parametrize("router", ["merged", "polytropon", "mhr", "task_moe", "dfwe", "lorahub",
                                    "retrieval", "average_activation_build"])
def test_method_router_files_are_refused_not_silently_routed(router, capsys):
  """These files configure phatgoose_jax.methods (Python API, demo): eval used to ignore them
  and report PHATGOOSE routing under the label 'base'."""
  gin.clear_config()
  try:
    code = eval_lib.main(["--gin_file=models/tiny.gin", "--gin_file=runs/eval.gin",
                          f"--gin_file=routers/{router}.gin", "--gin.CHECKPOINT_PATH='/c'",
                          "--gin.MIXTURE_OR_TASK_NAME='x'", "--gin.EVAL_OUTPUT_DIR='/tmp/x'"])
  finally:
    gin.clear_config()
  err = capsys.readouterr().err
  assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
  assert "phatgoose_jax.methods." in err and "which phatgoose_jax.eval does not run" in err
  assert "routers/single_expert.gin" in err


def test_help_and_unquoted_string_values(capsys):
  assert eval_lib.main(["--help"]) == 0
  assert "python -m phatgoose_jax.eval --gin_file=" in capsys.readouterr().out
  gin.clear_config()
  try:
    code = eval_lib.main(["--gin_file=runs/eval.gin", "--gin.EVAL_OUTPUT_DIR=/tmp/x/y"])
  finally:
    gin.clear_config()
  err = capsys.readouterr().err
  assert code == 2 and err.count("\n") == 1
  assert "'EVAL_OUTPUT_DIR=/tmp/x/y'" in err and "inner quotes" in err


def test_an_unused_macro_chain_is_not_reported(capsys):
  """Binding evaluate.initial_checkpoint_path directly leaves CHECKPOINT_PATH (and the
  INITIAL_CHECKPOINT_PATH it refers to) unused: no 'not defined' error for them."""
  gin.clear_config()
  try:
    code = eval_lib.main(["--gin_file=models/tiny.gin", "--gin_file=runs/eval.gin",
                          "--gin.MIXTURE_OR_TASK_NAME='x'", "--gin.EVAL_OUTPUT_DIR='/tmp/x'",
                          "--gin.phatgoose_jax.eval.evaluate.initial_checkpoint_path='/c'"])
  finally:
    gin.clear_config()
  err = capsys.readouterr().err
  assert code == 2 and "not defined" not in err and "unknown seqio task" in err


def test_a_top_k_router_without_vectors_is_refused(tmp_path):
  """router_vectors=None is for 'uniform' / 'example_weights'; a top-k router would route on
  zero gates."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from phatgoose_jax.library import ExpertLibrary, site_shapes  # pylint: disable=g-import-not-at-top
  from phatgoose_jax.models.config import tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config(num_encoder_layers=1, num_decoder_layers=1)
  lib = ExpertLibrary.create(str(tmp_path / "lib"), "sha256:" + "11" * 32, config)
  rng = np.random.default_rng(0)
  for name in ("e0", "e1"):
    lib.add(name, {site: {"lora_a": rng.normal(size=(d, 2)).astype(np.float32),
                          "lora_b": rng.normal(size=(2, f)).astype(np.float32)}
                   for site, (d, f) in site_shapes(config).items()}, 0.5)
  gin.clear_config()
  try:
    gin.bind_parameter("AdapterConfig.router", "phatgoose")
    with pytest.raises(eval_lib.EvalConfigError, match="router 'phatgoose' routes by library"):
      eval_lib._adapters(lib.path, None, None)  # pylint: disable=protected-access
    gin.bind_parameter("AdapterConfig.router", "uniform")
    _, tree, names = eval_lib._adapters(lib.path, None, None)  # pylint: disable=protected-access
    assert names == ["e0", "e1"]
    gates = tree["encoder"]["layers_0"]["attention"]["query"]["gates"]
    assert gates.shape == (2, config.emb_dim) and not gates.any()
  finally:
    gin.clear_config()
