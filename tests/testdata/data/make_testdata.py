"""Writes the few upstream-format rows per family used by tests/data/test_families.py.

Run from the repository root: `python tests/testdata/data/make_testdata.py`. Row formats:
  p3_tfrecord/data/<config>/  bigscience/P3 layout: <split>.tfrecord-00000-of-00001
      (tf.train.Example: inputs/targets int64 lists, *_pretokenized bytes, answer_choices bytes
      list; score-eval configs add idx [2], is_correct and weight; bool/int32 stored as int64),
      info.<split>.json and stats.<split>.json.
  p3/<config>/<split>.jsonl   the same rows exported as JSON lines (no token ids needed).
  flan_dump/part-00000.jsonl  Open-Orca/FLAN rows (inputs, targets, _template_idx,
      _task_source, _task_name, _template_type).
  bigbench/<task>/<part>.jsonl  tasksource/bigbench rows (inputs, targets,
      multiple_choice_targets, multiple_choice_scores, idx) or lukaemon/bbh rows (input, target).
The texts are made up; only the formats follow upstream.
"""
import json
import os
import sys

import tensorflow as tf

sys.path.insert(0, os.getcwd())
from phatgoose_jax.data.catalog import p3 as p3_catalog  # noqa: E402
from phatgoose_jax.data.catalog import t0_heldout  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))


def _bytes(vals):
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v.encode() for v in vals]))


def _ints(vals):
  return tf.train.Feature(int64_list=tf.train.Int64List(value=list(vals)))


def _floats(vals):
  return tf.train.Feature(float_list=tf.train.FloatList(value=list(vals)))


def _fake_ids(text):
  return [3 + (sum(map(ord, w)) % 90) for w in text.split()] + [1]


def write_p3_tfrecord(config, split, rows, score_eval=False):
  d = os.path.join(ROOT, "p3_tfrecord", "data", config)
  os.makedirs(d, exist_ok=True)
  with tf.io.TFRecordWriter(os.path.join(d, f"{split}.tfrecord-00000-of-00001")) as w:
    for r in rows:
      f = {"inputs": _ints(_fake_ids(r["inputs_pretokenized"])),
           "inputs_pretokenized": _bytes([r["inputs_pretokenized"]]),
           "targets": _ints(_fake_ids(r["targets_pretokenized"])),
           "targets_pretokenized": _bytes([r["targets_pretokenized"]]),
           "answer_choices": _bytes(r["answer_choices"])}
      if score_eval:
        f.update(idx=_ints(r["idx"]), is_correct=_ints([int(r["is_correct"])]),
                 weight=_floats([1.0]))
      w.write(tf.train.Example(features=tf.train.Features(feature=f)).SerializeToString())
  feats = {"answer_choices": {"dtype": "string", "shape": [None]},
           "inputs": {"dtype": "int32", "shape": [None]},
           "inputs_pretokenized": {"dtype": "string", "shape": []},
           "targets": {"dtype": "int32", "shape": [None]},
           "targets_pretokenized": {"dtype": "string", "shape": []}}
  if score_eval:
    feats.update(idx={"dtype": "int32", "shape": [2]}, is_correct={"dtype": "bool", "shape": []},
                 weight={"dtype": "float32", "shape": []})
  with open(os.path.join(d, f"info.{split}.json"), "w") as f:
    json.dump({"features": feats, "num_shards": 1}, f)
  with open(os.path.join(d, f"stats.{split}.json"), "w") as f:
    json.dump({"examples": len(rows), "inputs_max_tokens": 16, "targets_max_tokens": 4}, f)


def write_jsonl(path, rows):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")


def score_eval_rows(n_examples, choices, label_of, text_of):
  rows = []
  for e in range(n_examples):
    for c, choice in enumerate(choices):
      rows.append({"inputs_pretokenized": text_of(e), "targets_pretokenized": choice,
                   "answer_choices": list(choices), "idx": [e, c],
                   "is_correct": c == label_of(e), "weight": 1.0})
  return rows


def main():
  # P3 TFRecord: ag_news, every template, 2 train rows each.
  news = ["the team won the final game", "the bank raised its rates"]
  labels = ["Sports", "Business"]
  choices = ["World politics", "Sports", "Business", "Science and technology"]
  for t, config in enumerate(p3_catalog.p3_dataset("ag_news").templates):
    rows = [{"inputs_pretokenized": f"template {t}: what is this news about? {n}",
             "targets_pretokenized": lab, "answer_choices": choices}
            for n, lab in zip(news, labels)]
    write_p3_tfrecord(config, "train", rows)
  # P3 JSONL: quarel, every template, 2 train rows and 1 validation row.
  for t, config in enumerate(p3_catalog.p3_dataset("quarel").templates):
    mk = lambda q, a: {"inputs_pretokenized": f"quarel {t}: {q}", "targets_pretokenized": a,
                       "answer_choices": ["glass", "wood"]}
    write_jsonl(os.path.join(ROOT, "p3", config, "train.jsonl"),
                [mk("which surface is smoother", "glass"), mk("which one is rougher", "wood")])
    write_jsonl(os.path.join(ROOT, "p3", config, "validation.jsonl"),
                [mk("which is slicker", "glass")])
  # T0 held-out, JSONL: COPA score-eval rows (2 examples x 2 choices per template).
  copa = t0_heldout.heldout_dataset("copa")
  for t, config in enumerate(copa.score_eval_configs):
    rows = score_eval_rows(2, ["the sun rose", "the man slept"], lambda e: e % 2,
                           lambda e: f"copa {t}: premise number {e}, what happened?")
    write_jsonl(os.path.join(ROOT, "p3", config, "validation.jsonl"), rows)
  # T0 held-out, TFRecord: CB score-eval rows (1 example x 3 choices per template).
  cb = t0_heldout.heldout_dataset("cb")
  for t, config in enumerate(cb.score_eval_configs):
    rows = score_eval_rows(1, ["Yes", "No", "Maybe"], lambda e: 2,
                           lambda e: f"cb {t}: it rained, so is the ground wet?")
    write_p3_tfrecord(config, "validation", rows, score_eval=True)
  # Open-Orca/FLAN dump rows.
  def flan(task, ttype, i, o, idx=0, src="Flan2021"):
    return {"inputs": i, "targets": o, "_template_idx": idx, "_task_source": src,
            "_task_name": task, "_template_type": ttype}
  arc = "ai2_arc/ARC-Easy:1.0.0"
  dump = [flan(arc, "zs_opt", f"arc question {k}: which is a metal? options: iron, wood",
               "iron", k) for k in range(12)]
  dump += [flan(arc, "zs_noopt", "arc question: name a gas", "oxygen", 3),
           flan(arc, "fs_opt", "few shot arc question", "few shot answer", 4),
           flan(arc, "zs_opt", "   ", "blank input", 5),
           flan("bool_q:1.0.0", "zs_noopt", "is the sky blue?", "yes", 0),
           flan("bool_q:1.0.0", "fs_noopt", "few shot boolq", "no", 1),
           flan("task228_arc_answer_generation_easy", "zs_opt", "niv2 arc input",
                "niv2 arc output", 0, "NIv2")]
  write_jsonl(os.path.join(ROOT, "flan_dump", "part-00000.jsonl"), dump)
  # BIG-bench (tasksource/bigbench rows; boolean_expressions in lukaemon/bbh rows).
  def bb(i, t, mc=(), sc=(), idx=0):
    return {"inputs": i, "targets": list(t), "multiple_choice_targets": list(mc),
            "multiple_choice_scores": list(sc), "idx": idx}
  nav = os.path.join(ROOT, "bigbench", "navigate")
  write_jsonl(os.path.join(nav, "train.jsonl"), [
      bb("Take 1 step forward. Take 1 step back. Are you at the start?", ["Yes"],
         ["Yes", "No"], [1, 0], 0),
      bb("Take 2 steps left. Are you at the start?", ["No"], ["Yes", "No"], [0, 1], 1)])
  write_jsonl(os.path.join(nav, "validation.jsonl"), [
      bb("Turn around twice. Are you facing forward?", ["Yes"], ["Yes", "No"], [1, 0], 0)])
  write_jsonl(os.path.join(ROOT, "bigbench", "boolean_expressions", "test.jsonl"), [
      {"input": "not ( True ) and ( True ) is", "target": "False"},
      {"input": "True and not not ( not False ) is", "target": "True"}])
  ws = os.path.join(ROOT, "bigbench", "word_sorting")
  write_jsonl(os.path.join(ws, "train.jsonl"), [
      bb("Sort the following words alphabetically: List: pear apple", ["apple pear"])])
  write_jsonl(os.path.join(ws, "validation.jsonl"), [
      bb("Sort the following words alphabetically: List: fig date", ["date fig"])])
  cl = os.path.join(ROOT, "bigbench", "conlang_translation")
  write_jsonl(os.path.join(cl, "train.jsonl"), [
      bb("Translate Gazzarra to English: bluk blak", ["the big dog", "a big dog"])])
  write_jsonl(os.path.join(cl, "validation.jsonl"), [
      bb("Translate Gazzarra to English: blik", ["the cat"])])


if __name__ == "__main__":
  main()
