"""P3 / T0 held-out / FLAN / BIG-bench seqio registrations, read offline from upstream-format rows.

Rows live in tests/testdata/data (written by make_testdata.py there): bigscience/P3 TFRecords and
JSONL exports, Open-Orca/FLAN dump rows, tasksource/bigbench and lukaemon/bbh rows.
"""

import glob
import json
import pathlib

import gin
import numpy as np
import pytest
import seqio

from phatgoose_jax import gin_utils
from phatgoose_jax.data import bigbench_tasks
from phatgoose_jax.data import flan_tasks
from phatgoose_jax.data import p3_tasks
from phatgoose_jax.data import pipeline
from phatgoose_jax.data import preprocessors as prep
from phatgoose_jax.data import registry
from phatgoose_jax.data import rouge
from phatgoose_jax.data import t0_tasks
from phatgoose_jax.data import vocab as vocab_lib
from phatgoose_jax.data.catalog import bigbench as catalog_bigbench
from phatgoose_jax.data.catalog import p3 as p3_catalog

DATA = pathlib.Path(__file__).parent.parent / "testdata" / "data"


def _texts():
  out = []
  for path in glob.glob(str(DATA / "**" / "*.jsonl"), recursive=True):
    for line in open(path, encoding="utf-8"):
      row = json.loads(line)
      out += [str(v) for v in row.values() if isinstance(v, str)]
      out += [str(x) for v in row.values() if isinstance(v, list) for x in v]
  out += ["template what is this news about? the team won the final game Sports Business",
          "the bank raised its rates World politics Science and technology", "Answer:",
          "cb 0: it rained, so is the ground wet? Yes No Maybe"]  # TFRecord-only texts.
  return sorted(set(out))


@pytest.fixture(scope="module")
def vocab_path(tmp_path_factory):
  path = tmp_path_factory.mktemp("families") / "families.model"
  vocab_lib.build_sentencepiece_model(_texts(), path, vocab_size=300)
  return str(path)


@pytest.fixture(scope="module")
def vocabulary(vocab_path):
  return vocab_lib.get_vocabulary(vocab_path)


def _read(name, split, vocabulary):
  ds = seqio.get_mixture_or_task(name).get_dataset(None, split=split, shuffle=False)
  rows = list(ds.as_numpy_iterator())
  for r in rows:  # Tokenized: non-empty int ids ending in EOS.
    for k in ("inputs", "targets"):
      assert r[k].dtype in (np.int32, np.int64) and r[k].size and r[k][-1] == 1, (name, k)
  return rows


def _text(vocabulary, ids):
  return vocabulary.decode([int(i) for i in ids if i != 1])


def _names_with(prefix):
  return [n for n in seqio.TaskRegistry.names() if n.startswith(prefix)]


def test_p3_family(vocabulary):
  names = p3_tasks.register_p3_tasks(vocabulary, source="tfrecord",
                                     p3_dir=str(DATA / "p3_tfrecord"))
  assert len(names) == 37 and names[-1] == "p3_multitask"
  assert len(_names_with("p3_")) == 36
  mix = seqio.get_mixture_or_task("p3_multitask")
  assert len(mix.tasks) == 36
  # TFRecord source, 7 templates x 2 rows, interleaved round-robin over templates.
  rows = _read("p3_ag_news", "train", vocabulary)
  assert len(rows) == 14
  first = [_text(vocabulary, r["inputs"]) for r in rows[:7]]
  assert [s.split(":")[0] for s in first] == [f"template {t}" for t in range(7)]
  assert _text(vocabulary, rows[0]["targets"]) == "Sports"
  assert [c.decode() for c in rows[0]["answer_choices"]][1] == "Sports"
  # T0 rate: 7 templates * t0_mixture_rate(2 rows from stats.train.json, 7) = 14.
  assert mix.get_rate(seqio.get_mixture_or_task("p3_ag_news")) == 14.0
  with pytest.raises(p3_tasks.P3DataError, match="samsum_Generate_a_summary"):
    _read("p3_samsum", "train", vocabulary)
  # Idempotent re-registration with a cap of 7 rows per dataset (1 per template).
  p3_tasks.register_p3_tasks(vocabulary, source="tfrecord", p3_dir=str(DATA / "p3_tfrecord"),
                             cap=7)
  assert len(_names_with("p3_")) == 36
  assert len(_read("p3_ag_news", "train", vocabulary)) == 7
  # The cap keeps a seeded uniform sample of each template's rows, not its first rows.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  rows = tf.data.Dataset.range(1000)
  picked = list(p3_tasks.sample_rows(rows, 50, "cfg").as_numpy_iterator())
  assert len(picked) == 50 == len(set(picked)) and picked == sorted(picked)
  assert max(picked) > 900 and picked != list(range(50))
  assert picked == list(p3_tasks.sample_rows(rows, 50, "cfg").as_numpy_iterator())  # seeded
  assert picked != list(p3_tasks.sample_rows(rows, 50, "other").as_numpy_iterator())
  assert list(p3_tasks.sample_rows(rows.take(5), 50, "cfg").as_numpy_iterator()) == list(range(5))
  # JSONL export of quarel (5 templates): 10 train rows. Its validation split is the eval rows
  # (the _score_eval configs, see the next test), which this export lacks.
  p3_tasks.register_p3_tasks(vocabulary, source="jsonl", data_dir=str(DATA))
  assert len(_read("p3_quarel", "train", vocabulary)) == 10
  with pytest.raises(Exception, match="quarel_choose_between_score_eval"):
    _read("p3_quarel", "validation", vocabulary)
  assert p3_tasks.dataset_templates(p3_catalog.p3_dataset("trec"))  # TREC reads P3 configs.
  with pytest.raises(p3_tasks.P3DataError, match="p3_dir"):
    p3_tasks.register_p3_tasks(vocabulary, source="tfrecord")


def test_p3_expert_validation_reads_the_eval_split_and_scores_it(vocabulary, tmp_path):
  """An expert's validation split reads its catalog eval rows (quarel: every template's
  _score_eval rows, grouped per (example, template)) and has a metric, so VALIDATION='task'
  works; token validation teacher-forces only the correct choices."""
  import shutil  # pylint: disable=g-import-not-at-top
  data = tmp_path / "data"
  shutil.copytree(DATA, data)
  spec = {d.key: d for d in p3_catalog.P3_DATASETS}["quarel"]
  for t, config in enumerate(p3_tasks.eval_templates(spec)):
    d = data / "p3" / (config + "_score_eval")
    d.mkdir(parents=True)
    rows = [{"inputs_pretokenized": f"q{e} t{t}", "targets_pretokenized": c,
             "answer_choices": ["glass", "wood"], "idx": [e, i], "is_correct": c == "glass",
             "weight": 1.0} for e in range(3) for i, c in enumerate(["glass", "wood"])]
    (d / "validation.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  p3_tasks.register_p3_tasks(vocabulary, source="jsonl", data_dir=str(data))
  task = seqio.get_mixture_or_task("p3_quarel")
  assert task.metric_fns == [prep.rank_classification_accuracy]
  val = _read("p3_quarel", "validation", vocabulary)
  n = len(p3_tasks.eval_templates(spec))
  assert len(val) == 3 * 2 * n
  groups = {int(r["idx"][0]) for r in val}
  assert groups == set(range(3 * n))  # (example, template) pairs are distinct groups
  token = list(pipeline.get_dataset("p3_quarel", {"inputs": 16, "targets": 4}, "validation",
                                    batch_size=3 * n, shuffle=False, num_epochs=1,
                                    drop_remainder=False))
  assert sum(len(b["decoder_target_tokens"]) for b in token) == 3 * n  # correct rows only
  # a generative dataset scores with its official metrics (tests/data/test_text_metrics.py)
  xsum = {d.key: d for d in p3_catalog.P3_DATASETS}["xsum"]
  assert [f.__name__ for f in p3_tasks.validation_metrics(xsum)["metric_fns"]] == [
      "bleu", "rouge_l_only"]


def test_t0_heldout_family(vocabulary):
  names = t0_tasks.register_t0_heldout_tasks(vocabulary, source="jsonl", data_dir=str(DATA))
  assert len(names) == 12 and len(_names_with("t0_heldout_")) == 11
  rows = _read("t0_heldout_copa", "validation", vocabulary)
  assert len(rows) == 8 * 2 * 2  # templates x examples x choices
  groups = {}
  for r in rows:
    groups.setdefault(int(r["idx"][0]), []).append(r)
  assert sorted(groups) == list(range(16))  # (example, template) pairs kept distinct
  for g, rs in groups.items():
    example, template = divmod(g, 8)
    assert all(int(r["template"]) == template for r in rs)
    assert [int(r["idx"][1]) for r in rs] == [0, 1]
    assert [bool(r["is_correct"]) for r in rs] == [example == 0, example == 1]
    assert _text(vocabulary, rs[0]["inputs"]).startswith(f"copa {template}:")
  # Rank classification through the task's postprocessor and metric.
  task = seqio.get_mixture_or_task("t0_heldout_copa")
  targets = [task.postprocess_fn(None, example=r, is_target=True) for r in rows]
  good = [0.0 if r["is_correct"] else -1.0 for r in rows]
  metric = task.metric_fns[0]
  assert metric(targets, good)["accuracy"] == 100.0
  # Even groups rank the correct choice first, odd groups the wrong one.
  half = [(0.0 if r["is_correct"] else -1.0) * (1 if int(r["idx"][0]) % 2 == 0 else -1)
          - (0.0 if int(r["idx"][0]) % 2 == 0 else 1.0) for r in rows]
  assert metric(targets, half)["accuracy"] == 50.0
  # TFRecord score-eval rows (CB: 15 templates x 1 example x 3 choices, "Maybe" correct).
  t0_tasks.register_t0_heldout_tasks(vocabulary, source="tfrecord",
                                     p3_dir=str(DATA / "p3_tfrecord"))
  cb = _read("t0_heldout_cb", "validation", vocabulary)
  assert len(cb) == 45
  assert [_text(vocabulary, r["targets"]) for r in cb if r["is_correct"]] == ["Maybe"] * 15
  assert sorted({int(r["idx"][0]) for r in cb}) == list(range(15))
  results = {k: 50.0 for k in ("rte", "hellaswag", "copa", "wic", "winogrande", "cb",
                               "story_cloze", "anli_r1", "anli_r2", "anli_r3")}
  results["t0_heldout_wsc"] = {"accuracy": 61.0}
  assert t0_tasks.t0_heldout_average(results) == pytest.approx((500 + 61) / 11)
  del results["cb"]
  with pytest.raises(t0_tasks.HeldoutDataError, match="cb"):
    t0_tasks.t0_heldout_average(results)


def test_flan_family(vocabulary):
  names = flan_tasks.register_flan_tasks(
      vocabulary, source="jsonl", data_dir=str(DATA),
      file_pattern="{data_dir}/flan_dump/*.jsonl", p3_source="jsonl")
  assert len(names) == 167 and names[-1] == "flan_multitask"
  assert len(_names_with("flan_")) == 166
  arc = "flan_flan2021_ai2_arc_ARC-Easy:1.0.0".replace("-", "_")
  assert arc in names
  # 12 zs_opt + 1 zs_noopt rows kept (few-shot and blank dropped): 1 validation, 12 train.
  train, val = _read(arc, "train", vocabulary), _read(arc, "validation", vocabulary)
  assert (len(train), len(val)) == (12, 1)
  texts = {_text(vocabulary, r["inputs"]) for r in train + val}
  assert "arc question: name a gas" in texts and not any("few shot" in t for t in texts)
  assert len(_read("flan_flan2021_bool_q:1.0.0", "train", vocabulary)) == 1
  with pytest.raises(flan_tasks.FlanDataError, match="Translation"):
    _read("flan_niv2_Translation", "train", vocabulary)
  # P3 experts of the FLAN setting read P3 rows (quarel JSONL export).
  assert len(_read("flan_p3_quarel", "train", vocabulary)) == 10
  # Validation metrics as the official gins: ROUGE-L for FLAN2021/NIv2/Dialog experts
  # (flanv2_t5xl.gin: metrics = ["rouge"]); a P3 expert validates as in the P3 setting.
  assert seqio.get_mixture_or_task(arc).metric_fns == [rouge.rouge_l_only]
  p3_quarel = seqio.get_mixture_or_task("flan_p3_quarel")
  assert p3_quarel.metric_fns == [prep.rank_classification_accuracy]
  assert p3_quarel._postprocess_fn is prep.rank_classification_postprocessor  # pylint: disable=protected-access
  assert seqio.get_mixture_or_task("flan_p3_xsum").metric_fns[0].__name__ == "bleu"
  assert seqio.get_mixture_or_task("flan_p3_copa").metric_fns == [prep.exact_match_accuracy]
  # Decoding budgets: official max_gen_length - 1 (ARC-Easy 64, algebra__linear_1d 4, NIv2
  # Entity Relation Classification 2); P3 experts keep the targets length.
  assert registry.decode_length(arc) == 63
  assert registry.decode_length("flan_flan2021_algebra__linear_1d:1.0.0") == 3
  assert registry.decode_length("flan_niv2_Entity_Relation_Classification") == 1
  assert registry.decode_length("flan_p3_quarel") is None
  assert registry.decode_length("flan_p3_xsum") == 255  # p3_t5xl.gin max_gen_length 256
  # NIv2 with a supplied task-name list.
  flan_tasks.register_flan_tasks(
      vocabulary, source="jsonl", data_dir=str(DATA),
      file_pattern="{data_dir}/flan_dump/*.jsonl",
      niv2_task_names={"Misc.": ["task228_arc_answer_generation_easy"]})
  misc = _read("flan_niv2_Misc.", "train", vocabulary)
  assert [_text(vocabulary, r["targets"]) for r in misc] == ["niv2 arc output"]
  # The official split: RandomState(1234) permutation, first min(10%, 10k) held out.
  rows = list(range(50))
  v = flan_tasks.split_rows(rows, "validation")
  assert v == list(np.random.RandomState(1234).permutation(50)[:5])
  assert sorted(v + flan_tasks.split_rows(rows, "train")) == rows


def test_bigbench_family(vocabulary):
  names = bigbench_tasks.register_bigbench_tasks(vocabulary, source="jsonl", data_dir=str(DATA))
  assert len(_names_with("bbh_")) == 22 and len(_names_with("bbl_")) == 17
  assert len(names) == 22 + 17 + 2 and {"bbh", "bbl"} <= set(names)
  # MC (tasksource rows, train + validation): 3 examples x 2 choices.
  nav = _read("bbh_navigate", "validation", vocabulary)
  assert len(nav) == 6
  assert [tuple(int(i) for i in r["idx"]) for r in nav] == [(e, c) for e in range(3) for c in range(2)]
  assert [bool(r["is_correct"]) for r in nav] == [True, False, False, True, True, False]
  assert _text(vocabulary, nav[0]["inputs"]).endswith("Answer:")
  assert [_text(vocabulary, r["targets"]) for r in nav[:2]] == ["Yes", "No"]
  # lukaemon/bbh rows with the catalog's fixed choices (True, False).
  be = _read("bbh_boolean_expressions", "validation", vocabulary)
  assert [(_text(vocabulary, r["targets"]), bool(r["is_correct"])) for r in be] == [
      ("True", False), ("False", True), ("True", True), ("False", False)]
  # Generative: exact match over references; ROUGE for conlang (longest reference as target).
  ws = _read("bbh_word_sorting", "validation", vocabulary)
  task = seqio.get_mixture_or_task("bbh_word_sorting")
  refs = [task.postprocess_fn(b"x", example=r, is_target=True) for r in ws]
  assert refs == [["apple pear"], ["date fig"]]
  assert task.metric_fns[0](refs, ["apple pear", "fig date"])["accuracy"] == 50.0
  cl = _read("bbl_conlang_translation", "validation", vocabulary)
  assert _text(vocabulary, cl[0]["targets"]) == "the big dog"
  task = seqio.get_mixture_or_task("bbl_conlang_translation")
  refs = [task.postprocess_fn(b"x", example=r, is_target=True) for r in cl]
  # official process_data: ROUGE and exact match compare with targets[0] only
  assert refs == [["the big dog"], ["the cat"]]
  assert task.metric_fns[0](refs, ["a big dog", "the cat"])["rougeL"] == pytest.approx(
      100 * (2 / 3 + 1) / 2)
  # decoding budgets: the official HF generate(max_length=max_gen_length) counts the start token
  assert registry.decode_length("bbh_word_sorting") == 127
  assert registry.decode_length("bbl_conlang_translation") == 63
  assert registry.decode_length("bbh_navigate") is None


def test_bigbench_rows_follow_the_catalog_metric():
  by_name = {t.name: t for t in catalog_bigbench.BBH_TASKS}
  row = {"inputs": "q", "targets": ["Yes"], "multiple_choice_targets": ["Yes", "No", "Yes "],
         "multiple_choice_scores": [1, 0, 1]}
  single = bigbench_tasks.normalize_row(row, by_name["navigate"], "r")  # metric 'accuracy'
  assert single["choice_correct"] == [True, False, False]  # find_label: one answer
  multi = bigbench_tasks.normalize_row(row, by_name["geometric_shapes"], "r")
  assert multi["choice_correct"] == [True, False, True]  # accuracy_multiple_ans: every score 1
  gen = {"inputs": "q", "targets": ["4", "four"]}
  assert bigbench_tasks.normalize_row(gen, by_name["object_counting"], "r")["references"] == [
      "4", "four"]  # exact_match_multiple_ans
  em = bigbench_tasks.normalize_row(gen, by_name["multistep_arithmetic_two"], "r")
  assert em["references"] == ["4"] and em["targets"] == "four"  # exact_match: targets[0]


def test_rouge_hand_computed():
  s = rouge.score("The cat sat.", "the cat")
  assert s["rouge1"] == pytest.approx(0.8)      # P=1, R=2/3
  assert s["rouge2"] == pytest.approx(2 / 3)    # P=1, R=1/2
  assert s["rougeL"] == pytest.approx(0.8)      # LCS 2
  assert rouge.lcs_length("a b c d".split(), "a c x d".split()) == 3
  assert rouge.rouge([["x y", "the cat"]], ["the cat"])["rouge1"] == 100.0
  with pytest.raises(rouge.RougeError, match="targets"):
    rouge.rouge(["a"], [])


@pytest.fixture
def _clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


@pytest.mark.parametrize("name", ["p3", "t0_heldout", "flan", "bigbench", "synthetic"])
def test_gin_data_files_parse(name, vocab_path, _clean_gin):
  bindings = [f"VOCABULARY_PATH='{vocab_path}'", "VOCABULARY_EXTRA_IDS=0",
              f"DATA_DIR='{DATA}'"]
  gin_utils.parse_gin([f"data/{name}.gin"], bindings, finalize=False)
  assert isinstance(gin.query_parameter("%MIXTURE_OR_TASK_NAME"), str)
  if name == "synthetic":  # registered through MIXTURE_OR_TASK_MODULE (train and eval read it)
    from phatgoose_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    assert synthetic.task_module() == "phatgoose_jax.data.synthetic"
    assert "synthetic_compose2_choice" in seqio.TaskRegistry.names()
    assert "synthetic_multitask" in seqio.MixtureRegistry.names()
    return
  module = {"p3": p3_tasks, "t0_heldout": t0_tasks, "flan": flan_tasks,
            "bigbench": bigbench_tasks}[name]
  if name == "bigbench":  # Gin-bound registration, as the trainer triggers it.
    assert module.task_module() == "phatgoose_jax.data.bigbench_tasks"
    assert gin.query_parameter("%MIXTURE_OR_TASK_NAME") in seqio.MixtureRegistry.names()
    assert len(_read("bbh_navigate", "validation", None)) == 6
