"""Bad inputs through the command-line entry points: one line naming the culprit, no change on disk.

Every case of `CASES` prepares its inputs (copies of the session `world` in its own folder, then
corrupted or edited), runs an entry point and checks that
  * the exit status is the expected non-zero one (2: refused configuration / input);
  * stderr's non-blank content is exactly one line, which contains every ``expect`` substring
    (the file, flag, field or expert at fault);
  * 'Traceback' appears nowhere in stdout or stderr;
  * no file under the world or the case folders was created, removed or modified (paths, sizes,
    mtimes and sha256 compared before and after).
To stay fast, most cases run in ONE subprocess (`cli_driver.py`, which calls each entry point's
``main`` in-process with fds 1/2 captured); `SUBPROCESS_CASES` also run as real
``python -m ...`` processes.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from typing import Callable, Dict, List, Optional

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

LENGTHS = "--gin.TASK_FEATURE_LENGTHS={'inputs': 8, 'targets': 6}"
TRAIN = ["--gin_file=runs/train_expert.gin", "--gin.MODEL_DIR='{case}/run'",
         "--gin.MIXTURE_OR_TASK_NAME='rel_tiny'", "--gin.MIXTURE_OR_TASK_MODULE='rel_tasks'",
         "--gin.INITIAL_CHECKPOINT_PATH='{base_hf}'", LENGTHS, "--gin.BATCH_SIZE=2",
         "--gin.TRAIN_STEPS=2"]
GATE = ["--gin_file=runs/train_gate.gin"] + TRAIN[1:] + ["--gin.LORA_RANK=3"]
EVAL = ["--gin_file=runs/eval.gin", "--gin_file=routers/phatgoose.gin",
        "--gin.INITIAL_CHECKPOINT_PATH='{base_hf}'", "--gin.MIXTURE_OR_TASK_NAME='rel_tiny'",
        "--gin.MIXTURE_OR_TASK_MODULE='rel_tasks'", "--gin.EVAL_OUTPUT_DIR='{case}/out'",
        "--gin.LIBRARY_PATH='{library}'", LENGTHS, "--gin.BATCH_SIZE=2"]


def _with(argv: List[str], **replace) -> List[str]:
  """argv with ``--gin.NAME=...`` flags replaced (value None drops the flag)."""
  out = []
  for a in argv:
    name = a.split("=", 1)[0][len("--gin."):] if a.startswith("--gin.") else None
    if name in replace:
      if replace[name] is not None:
        out.append(f"--gin.{name}={replace[name]}")
    else:
      out.append(a)
  seen = {a.split("=", 1)[0][len("--gin."):] for a in argv if a.startswith("--gin.")}
  out += [f"--gin.{k}={v}" for k, v in replace.items() if k not in seen and v is not None]
  return out


# ------------------------------------------------------------------------------------------------
# Setups: (case dir, world) -> extra placeholders. They only write inside the case dir.
# ------------------------------------------------------------------------------------------------
def _copy(world, key, case, name=None) -> str:
  from rel_world import copy_writable  # pylint: disable=g-import-not-at-top
  src = world[key]
  return copy_writable(src, os.path.join(case, name or os.path.basename(src)))


def _truncate(path: str, keep: float = 0.5) -> None:
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.truncate(int(size * keep))


def _write(path: str, text: str) -> None:
  with open(path, "w") as f:
    f.write(text)


def _edit_json(path: str, fn: Callable[[dict], None]) -> None:
  with open(path) as f:
    obj = json.load(f)
  fn(obj)
  _write(path, json.dumps(obj))


def s_none(case, world):
  return {}


def s_empty_dir(case, world):
  os.makedirs(os.path.join(case, "notackpt"))
  return {}


def s_nonempty_dir(case, world):
  os.makedirs(os.path.join(case, "full"))
  _write(os.path.join(case, "full", "keep.txt"), "x")
  return {}


def s_hf_truncated(case, world):
  p = _copy(world, "base_hf", case)
  _truncate(os.path.join(p, "model.safetensors"))
  return {"ckpt": p}


def s_hf_bad_config(case, world):
  p = _copy(world, "base_hf", case)
  _write(os.path.join(p, "config.json"), '{"d_model": 24,')
  return {"ckpt": p}


def s_nan_checkpoint(case, world):
  from phatgoose_jax import checkpoints  # pylint: disable=g-import-not-at-top
  config, params = checkpoints.load_checkpoint(world["base_hf"])
  params["encoder"]["layers_1"]["mlp"]["wo"]["kernel"][0, 0] = np.nan
  p = os.path.join(case, "nan_ckpt")
  checkpoints.save_checkpoint(p, params, config)
  return {"ckpt": p}


def s_bad_gin(case, world):
  _write(os.path.join(case, "bad.gin"), "phatgoose_jax.train.train.batch_size = = 3\n")
  return {}


def s_export_truncated(case, world):
  p = _copy(world, "export_r3", case)
  _truncate(os.path.join(p, "lora.safetensors"), 0.3)
  return {"exp": p}


def _rewrite_export(case, world, fn) -> str:
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  p = _copy(world, "export_r3", case)
  f = os.path.join(p, "lora.safetensors")
  tensors = fn(dict(load_file(f)))
  os.remove(f)
  save_file(tensors, f)
  return p


def s_export_fewer_sites(case, world):
  return {"exp": _rewrite_export(case, world, lambda t: {k: v for k, v in t.items()
                                                         if not k.startswith("decoder/")})}


def s_export_nan(case, world):
  def fn(t):
    k = sorted(k for k in t if k.endswith("lora_a"))[0]
    t[k] = t[k].copy()
    t[k][1, 1] = np.inf
    return t
  return {"exp": _rewrite_export(case, world, fn)}


def s_library_copy(case, world):
  return {"lib": _copy(world, "library", case)}


def s_library_bad_index(case, world):
  p = _copy(world, "library", case)
  _write(os.path.join(p, "library.json"), '{"format": "phatgoose_jax.expert_library", ')
  return {"lib": p}


def s_library_version(case, world):
  p = _copy(world, "library", case)
  _edit_json(os.path.join(p, "library.json"), lambda o: o.update(format_version=99))
  return {"lib": p}


def s_library_truncated_entry(case, world):
  p = _copy(world, "library", case)
  _truncate(os.path.join(p, "experts", "task_b", "weights.safetensors"), 0.9)
  return {"lib": p}


def s_library_partial_entry(case, world):
  p = _copy(world, "library", case)
  os.remove(os.path.join(p, "experts", "task_a", "metadata.json"))
  return {"lib": p}


def s_library_entry_other_base(case, world):
  p = _copy(world, "library", case)
  _edit_json(os.path.join(p, "experts", "task_b", "metadata.json"),
             lambda o: o.update(base_fingerprint=world["fingerprint_other"]))
  return {"lib": p}


def _peft(case, world, edit=None, text=None):
  p = _copy(world, "peft_a", case, "peft")
  cfg = os.path.join(p, "adapter_config.json")
  if text is not None:
    _write(cfg, text)
  if edit is not None:
    _edit_json(cfg, edit)
  return {"peft": p}


def s_peft_no_r(case, world):
  return _peft(case, world, edit=lambda o: o.pop("r"))


def s_peft_dora(case, world):
  return _peft(case, world, edit=lambda o: o.update(use_dora=True))


def s_peft_rank_pattern(case, world):
  return _peft(case, world, edit=lambda o: o.update(rank_pattern={"q": 8}))


def s_peft_bad_json(case, world):
  return _peft(case, world, text="{'r': 4}")


def s_peft_r_mismatch(case, world):
  return _peft(case, world, edit=lambda o: o.update(r=6))


def s_peft_truncated(case, world):
  out = _peft(case, world)
  _truncate(os.path.join(out["peft"], "adapter_model.safetensors"), 0.5)
  return out


def s_peft_unknown_layer(case, world):
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  out = _peft(case, world)
  f = os.path.join(out["peft"], "adapter_model.safetensors")
  t = {k.replace("encoder.block.1.", "encoder.block.7."): v for k, v in load_file(f).items()}
  os.remove(f)
  save_file(t, f)
  return out


# ------------------------------------------------------------------------------------------------
# The table: id -> (entry, argv, setup, substrings expected in the one stderr line, exit status).
# ------------------------------------------------------------------------------------------------
CASES: Dict[str, tuple] = {
    # --- gin / flags (python -m phatgoose_jax.train) ---
    "train_gin_file_typo": ("train", ["--gin_file=runs/train_expertt.gin"] + TRAIN[1:], s_none,
                            ["train_expertt.gin"]),
    "train_unknown_parameter": ("train", TRAIN + ["--gin.phatgoose_jax.train.train.learning_rat=1"],
                                s_none, ["learning_rat"]),
    "train_unknown_configurable": ("train", TRAIN + ["--gin_bindings=no_such_fn.x = 1"], s_none,
                                   ["no_such_fn"]),
    "train_missing_macro": ("train", _with(TRAIN, MODEL_DIR=None), s_none, ["MODEL_DIR"]),
    "train_gin_syntax_error": ("train", TRAIN + ["--gin_file={case}/bad.gin"], s_bad_gin,
                               ["bad.gin"]),
    "train_unknown_flag": ("train", TRAIN + ["--bogus=1"], s_none, ["--bogus"]),
    "train_unknown_task": ("train", _with(TRAIN, MIXTURE_OR_TASK_NAME="'rel_tinny'"), s_none,
                           ["rel_tinny"]),
    "train_unknown_task_module": ("train", _with(TRAIN, MIXTURE_OR_TASK_MODULE="'no_such_tasks'"),
                                  s_none, ["no_such_tasks"]),
    "train_bad_mode": ("train", TRAIN + ["--gin.phatgoose_jax.train.train.mode='lorax'"], s_none,
                       ["lorax"]),
    "train_lengths_missing_targets": ("train", _with(TRAIN, TASK_FEATURE_LENGTHS="{'inputs': 8}"),
                                      s_none, ["TASK_FEATURE_LENGTHS", "targets"]),
    "train_batch_size_zero": ("train", _with(TRAIN, BATCH_SIZE="0"), s_none, ["BATCH_SIZE"]),
    "train_bad_validation": ("train", _with(TRAIN, VALIDATION="'tasks'"), s_none,
                             ["train.validation", "'tasks'"]),
    "train_learning_rate_inf": ("train", _with(TRAIN, LEARNING_RATE="1e999"), s_none,
                                ["learning_rate", "inf"]),
    # --- base checkpoints ---
    "train_ckpt_missing": ("train", _with(TRAIN, INITIAL_CHECKPOINT_PATH="'{case}/nope'"), s_none,
                           ["{case}/nope"]),
    "train_ckpt_not_a_checkpoint": ("train", _with(TRAIN,
                                                   INITIAL_CHECKPOINT_PATH="'{case}/notackpt'"),
                                    s_empty_dir, ["{case}/notackpt", "not a checkpoint"]),
    "train_ckpt_truncated": ("train", _with(TRAIN, INITIAL_CHECKPOINT_PATH="'{ckpt}'"),
                             s_hf_truncated, ["model.safetensors"]),
    "train_ckpt_bad_config_json": ("train", _with(TRAIN, INITIAL_CHECKPOINT_PATH="'{ckpt}'"),
                                   s_hf_bad_config, ["config.json"]),
    "train_ckpt_nan_weight": ("train", _with(TRAIN, INITIAL_CHECKPOINT_PATH="'{ckpt}'"),
                              s_nan_checkpoint, ["encoder/layers_1/mlp/wo/kernel", "non-finite"]),
    # --- gate training: the expert to gate ---
    "gate_expert_missing": ("train", GATE + ["--gin.EXPERT_PATH='{case}/noexp'"], s_none,
                            ["{case}/noexp"]),
    "gate_expert_rank_mismatch": ("train", _with(GATE, LORA_RANK="16") +
                                  ["--gin.EXPERT_PATH='{export_r3}'"], s_none,
                                  ["expert's rank is 3", "LORA_RANK"]),
    "gate_expert_truncated": ("train", GATE + ["--gin.EXPERT_PATH='{exp}'"], s_export_truncated,
                              ["lora.safetensors"]),
    "gate_expert_missing_sites": ("train", GATE + ["--gin.EXPERT_PATH='{exp}'"],
                                  s_export_fewer_sites, ["decoder/layers_0"]),
    "gate_expert_extra_sites": ("train", GATE + ["--gin.EXPERT_PATH='{export_r3}'",
                                                 "--gin.AdapterConfig.site_pattern='encoder/.*'"],
                                s_none, ["decoder/layers_0", "site"]),
    # --- expert library (phatgoose-jax library ...) ---
    "lib_create_base_missing": ("cli", ["library", "create", "{case}/lib", "--base",
                                        "{case}/nobase"], s_none, ["{case}/nobase"]),
    "lib_create_nonempty_dir": ("cli", ["library", "create", "{case}/full", "--base", "{base_hf}"],
                                s_nonempty_dir, ["{case}/full", "non-empty"]),
    "lib_create_rank_zero": ("cli", ["library", "create", "{case}/lib", "--base", "{base_hf}",
                                     "--rank", "0"], s_none, ["rank", "0"]),
    "lib_missing_library": ("cli", ["library", "add", "{case}/nolib", "x", "--peft", "{peft_a}"],
                            s_none, ["{case}/nolib"]),
    "lib_corrupt_index": ("cli", ["library", "list", "{lib}"], s_library_bad_index,
                          ["library.json", "not valid JSON"]),
    "lib_format_version": ("cli", ["library", "add", "{lib}", "x", "--peft", "{peft_a}"],
                           s_library_version, ["library.json", "format_version"]),
    "lib_add_other_base": ("cli", ["library", "add", "{library}", "xo", "{export_other}"], s_none,
                           ["'xo'", "base_fingerprint"]),
    "lib_add_rank_pinned": ("cli", ["library", "add", "{library_rank3}", "t4", "--peft",
                                    "{peft_a}"], s_none, ["'t4'", "'rank'", "3"]),
    "lib_add_sites_mismatch": ("cli", ["library", "add", "{library}", "enc", "{exp}"],
                               s_export_fewer_sites, ["'enc'", "'sites'"]),
    "lib_add_nonfinite_export": ("cli", ["library", "add", "{library_rank3}", "bad", "{exp}"],
                                 s_export_nan, ["'bad'", "lora_a", "non-finite"]),
    "lib_add_truncated_export": ("cli", ["library", "add", "{library_rank3}", "bad", "{exp}"],
                                 s_export_truncated, ["lora.safetensors"]),
    "lib_add_duplicate": ("cli", ["library", "add", "{library}", "task_a", "--peft", "{peft_a}"],
                          s_none, ["'task_a'", "already exists"]),
    "lib_add_bad_name": ("cli", ["library", "add", "{library}", "../evil", "--peft", "{peft_a}"],
                         s_none, ["'../evil'"]),
    "lib_add_two_sources": ("cli", ["library", "add", "{library}", "x", "{export_r3}", "--peft",
                                    "{peft_a}"], s_none, ["exactly one", "--peft"]),
    "lib_remove_unknown": ("cli", ["library", "remove", "{library}", "nobody"], s_none,
                           ["'nobody'"]),
    "lib_info_unknown": ("cli", ["library", "info", "{library}", "nobody"], s_none, ["'nobody'"]),
    # --- HF PEFT adapters ---
    "peft_missing_r": ("cli", ["library", "add", "{library}", "p", "--peft", "{peft}"],
                       s_peft_no_r, ["adapter_config.json", "'r'"]),
    "peft_dora": ("cli", ["library", "add", "{library}", "p", "--peft", "{peft}"], s_peft_dora,
                  ["adapter_config.json", "use_dora"]),
    "peft_rank_pattern": ("cli", ["library", "add", "{library}", "p", "--peft", "{peft}"],
                          s_peft_rank_pattern, ["adapter_config.json", "rank_pattern"]),
    "peft_bad_json": ("cli", ["library", "add", "{library}", "p", "--peft", "{peft}"],
                      s_peft_bad_json, ["adapter_config.json", "not valid JSON"]),
    "peft_r_mismatch": ("cli", ["library", "add", "{library}", "p", "--peft", "{peft}"],
                        s_peft_r_mismatch, ["adapter_model.safetensors", "'r' = 6"]),
    "peft_truncated_weights": ("cli", ["library", "add", "{library}", "p", "--peft", "{peft}"],
                               s_peft_truncated, ["adapter_model.safetensors", "truncated"]),
    "peft_unknown_layer": ("cli", ["library", "add", "{library}", "p", "--peft", "{peft}"],
                           s_peft_unknown_layer, ["'p'", "encoder/layers_7"]),
    # --- evaluation over a library (python -m phatgoose_jax.eval) ---
    "eval_empty_library": ("eval", _with(EVAL, LIBRARY_PATH="'{library_empty}'"), s_none,
                           ["{library_empty}", "no experts"]),
    "eval_library_other_base": ("eval", _with(EVAL, INITIAL_CHECKPOINT_PATH="'{base_other}'"),
                                s_none, ["{library}", "base_fingerprint"]),
    "eval_entry_other_base": ("eval", _with(EVAL, LIBRARY_PATH="'{lib}'"),
                              s_library_entry_other_base, ["'task_b'", "base_fingerprint"]),
    "eval_truncated_entry": ("eval", _with(EVAL, LIBRARY_PATH="'{lib}'"),
                             s_library_truncated_entry, ["'task_b'", "weights_sha256"]),
    "eval_partial_entry": ("eval", _with(EVAL, LIBRARY_PATH="'{lib}'"), s_library_partial_entry,
                           ["'task_a'", "metadata.json"]),
    "eval_library_missing": ("eval", _with(EVAL, LIBRARY_PATH="'{case}/nolib'"), s_none,
                             ["{case}/nolib"]),
    "eval_unknown_task": ("eval", _with(EVAL, MIXTURE_OR_TASK_NAME="'rel_tinny'"), s_none,
                          ["rel_tinny"]),
    "eval_router_file_typo": ("eval", [a.replace("phatgoose.gin", "phatgooze.gin") for a in EVAL],
                              s_none, ["phatgooze.gin"]),
    "eval_missing_macro": ("eval", _with(EVAL, EVAL_OUTPUT_DIR=None), s_none,
                           ["EVAL_OUTPUT_DIR"]),
    "eval_unknown_expert": ("eval", EVAL + ["--gin.phatgoose_jax.eval.evaluate.experts="
                                            "['task_a', 'task_z']"], s_none, ["'task_z'"]),
    # --- the console script itself ---
    "cli_unknown_command": ("cli", ["trian-expert"], s_none, ["trian-expert"]),
    "cli_train_expert_missing_macro": ("cli", ["train-expert"] + _with(TRAIN[1:],
                                                                      MODEL_DIR=None),
                                       s_none, ["MODEL_DIR"]),
    "cli_demo_bad_flag": ("cli", ["demo", "--bogus-flag"], s_none, ["--bogus-flag"]),
}

# Cases also run as real processes (one per entry point).
SUBPROCESS_CASES = {"lib_add_rank_pinned": ["-m", "phatgoose_jax.cli"],
                    "train_ckpt_truncated": ["-m", "phatgoose_jax.train"],
                    "eval_empty_library": ["-m", "phatgoose_jax.eval"]}


# ------------------------------------------------------------------------------------------------
# Machinery.
# ------------------------------------------------------------------------------------------------
def snapshot(*roots: str) -> Dict[str, tuple]:
  """{path: (kind, size, mtime_ns, sha256)} of everything under ``roots``."""
  snap = {}
  for root in roots:
    for dirpath, dirnames, filenames in os.walk(root):
      for d in dirnames:
        p = os.path.join(dirpath, d)
        snap[p] = ("dir", None, None, None)
      for n in filenames:
        p = os.path.join(dirpath, n)
        st = os.lstat(p)
        with open(p, "rb") as f:
          digest = hashlib.sha256(f.read()).hexdigest()
        snap[p] = ("file", st.st_size, st.st_mtime_ns, digest)
  return snap


def diff(before: Dict[str, tuple], after: Dict[str, tuple], prefix: str = "") -> List[str]:
  keys = sorted(k for k in set(before) | set(after) if k.startswith(prefix))
  return [f"{k}: {before.get(k)} -> {after.get(k)}" for k in keys if before.get(k) != after.get(k)]


def _fill(text: str, values: Dict[str, str]) -> str:
  for key, value in values.items():
    text = text.replace("{" + key + "}", str(value))
  return text


def _env(world) -> dict:
  return dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
              PYTHONPATH=os.pathsep.join([REPO, world["task_module_dir"]]))


def check_result(case_id: str, result: dict, expect: List[str], values: Dict[str, str],
                 rc: int = 2) -> None:
  out, err = result["stdout"], result["stderr"]
  assert "Traceback" not in out + err, f"{case_id}: traceback\n{err}"
  lines = [l for l in err.splitlines() if l.strip()]
  assert len(lines) == 1, f"{case_id}: stderr is not one line:\n{err}"
  assert result["rc"] == rc, f"{case_id}: exit status {result['rc']} (expected {rc}): {lines}"
  for sub in expect:
    assert _fill(sub, values) in lines[0], f"{case_id}: {_fill(sub, values)!r} not in {lines[0]!r}"


@pytest.fixture(scope="module")
def prepared(world, tmp_path_factory):
  """Sets up every case in its own folder; returns {id: (case dict, placeholder values)}."""
  root = tmp_path_factory.mktemp("cases")
  out = {}
  for case_id, (entry, argv, setup, expect) in CASES.items():
    case_dir = str(root / case_id)
    os.makedirs(case_dir)
    values = {k: v for k, v in world.items() if isinstance(v, str)}
    values.update(setup(case_dir, world))
    values["case"] = case_dir
    out[case_id] = ({"id": case_id, "entry": entry, "argv": [_fill(a, values) for a in argv],
                     "cwd": case_dir}, values)
  return str(root), out


@pytest.fixture(scope="module")
def driver_results(world, prepared, tmp_path_factory):
  """Runs every case through `cli_driver.py` in one subprocess; returns (results, diffs)."""
  root, cases = prepared
  work = tmp_path_factory.mktemp("driver")
  with open(work / "cases.json", "w") as f:
    json.dump([c for c, _ in cases.values()], f)
  before = snapshot(world["root"], root)
  proc = subprocess.run([sys.executable, os.path.join(HERE, "cli_driver.py"),
                         str(work / "cases.json"), str(work / "results.json")],
                        env=_env(world), capture_output=True, text=True, timeout=600)
  after = snapshot(world["root"], root)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(work / "results.json") as f:
    results = json.load(f)
  return results, before, after


def test_at_least_30_cases():
  assert len(CASES) >= 30
  # No two cases feed the same thing (same command line on the same prepared inputs).
  assert len({(tuple(c[1]), c[2].__name__) for c in CASES.values()}) == len(CASES)


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_bad_input_refused(case_id, world, prepared, driver_results):
  results, before, after = driver_results
  root, cases = prepared
  _, values = cases[case_id]
  check_result(case_id, results[case_id], CASES[case_id][3], values)
  changed = diff(before, after, os.path.join(root, case_id) + os.sep)
  assert not changed, f"{case_id} changed files: {changed}"


def test_world_unchanged(world, driver_results):
  _, before, after = driver_results
  changed = diff(before, after, world["root"])
  assert not changed, changed


@pytest.mark.parametrize("case_id", sorted(SUBPROCESS_CASES))
def test_bad_input_refused_by_real_process(case_id, world, prepared):
  root, cases = prepared
  case, values = cases[case_id]
  before = snapshot(world["root"], root)
  proc = subprocess.run([sys.executable] + SUBPROCESS_CASES[case_id] + case["argv"],
                        env=_env(world), capture_output=True, text=True, timeout=300,
                        cwd=case["cwd"])
  after = snapshot(world["root"], root)
  check_result(case_id, {"rc": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr},
               CASES[case_id][3], values)
  assert not diff(before, after), diff(before, after)
