"""Deterministic offline synthetic tasks for the embedded PHATGOOSE demo.

Design (for a tiny T5 trained from scratch on CPU). The lexicon is split into
six disjoint, ordered token families; each *expert task* applies one skill to
one family, announced by a skill word:

  task               input                          target
  reverse_colours    reverse red blue green         green blue red
  successor_animals  next cat fox                   dog owl       (next in family, cyclic)
  sort_digits        sort five two nine             two five nine (family order)
  skip_fruits        skip apple pear plum fig       apple plum    (every other item)
  rotate_tools       rotate saw drill rake          drill rake saw (first item to the end)
  double_letters     double alpha beta              alpha alpha beta beta

With probability `copy_prob` an expert example also carries a segment of
another family under the word `copy`, joined by `then` ("reverse red blue then
copy cat dog" -> "blue red then cat dog"), so every expert learns to apply its
skill to its own segment and leave the rest of the sequence alone.

*Held-out tasks* join 2 or 3 segments of *different* expert tasks
("next cat dog then reverse red blue" -> "dog cow then blue red"): the tokens of
each segment need a different expert's skill, which is where per-token routing
(PHATGOOSE, Muqeeth et al. 2024, Sec. 3) can beat per-example routing. They come
as generative tasks (exact match) and a rank-classification task whose 3
distractors apply a wrong skill (another expert's, or plain copy) to one
segment. Splits are disjoint by construction: an example's input string hashes
to one split. Inputs have <= 16 words and targets <= 12 words.

No tensors here, so no einsum letters are used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from typing import Any, Callable, Mapping, Optional, Sequence

import gin

from phatgoose_jax.data import preprocessors as prep

FAMILIES: dict[str, tuple[str, ...]] = {
    "colours": ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown"),
    "animals": ("cat", "dog", "cow", "pig", "hen", "fox", "owl", "bee"),
    "digits": ("zero", "one", "two", "three", "four", "five", "six", "seven",
               "eight", "nine"),
    "fruits": ("apple", "pear", "plum", "fig", "lime", "kiwi", "mango", "grape"),
    "tools": ("saw", "drill", "hammer", "wrench", "chisel", "pliers", "spade", "rake"),
    "letters": ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"),
}
_FAMILY_OF = {w: f for f, ws in FAMILIES.items() for w in ws}
SEPARATOR = "then"
COPY_WORD = "copy"


def _successor(items: Sequence[str]) -> list[str]:
  out = []
  for w in items:
    fam = FAMILIES[_FAMILY_OF[w]]
    out.append(fam[(fam.index(w) + 1) % len(fam)])
  return out


def _sort(items: Sequence[str]) -> list[str]:
  return sorted(items, key=lambda w: FAMILIES[_FAMILY_OF[w]].index(w))


# skill word -> function on a list of words.
SKILLS: dict[str, Callable[[Sequence[str]], list[str]]] = {
    "reverse": lambda xs: list(xs)[::-1],
    "next": _successor,
    "sort": _sort,
    "skip": lambda xs: list(xs)[::2],
    "rotate": lambda xs: list(xs)[1:] + list(xs)[:1],
    "double": lambda xs: [x for x in xs for _ in range(2)],
    COPY_WORD: list,
}


@dataclasses.dataclass(frozen=True)
class ExpertSkill:
  """One expert task: `skill` applied to items of `family`."""
  name: str
  skill: str
  family: str
  max_items: int  # Longest segment in expert-task examples.


EXPERTS: dict[str, ExpertSkill] = {e.name: e for e in (
    ExpertSkill("reverse_colours", "reverse", "colours", 5),
    ExpertSkill("successor_animals", "next", "animals", 5),
    ExpertSkill("sort_digits", "sort", "digits", 5),
    ExpertSkill("skip_fruits", "skip", "fruits", 5),
    ExpertSkill("rotate_tools", "rotate", "tools", 5),
    ExpertSkill("double_letters", "double", "letters", 4),
)}
SYNTHETIC_EXPERT_TASKS: tuple[str, ...] = tuple(EXPERTS)


@dataclasses.dataclass(frozen=True)
class HeldOutSpec:
  name: str
  num_segments: int
  max_items: int
  num_choices: int  # 0: generative.


HELDOUT: dict[str, HeldOutSpec] = {h.name: h for h in (
    HeldOutSpec("compose2_gen", 2, 4, 0),
    HeldOutSpec("compose2_choice", 2, 4, 4),
    HeldOutSpec("compose3_gen", 3, 2, 0),
)}
SYNTHETIC_HELDOUT_TASKS: tuple[str, ...] = tuple(HELDOUT)
SPLITS = ("train", "validation", "test")
_SPLIT_BUCKETS = {"train": range(0, 8), "validation": range(8, 9), "test": range(9, 10)}


class SyntheticTaskError(ValueError):
  """Unknown synthetic task or split, or bad generation arguments."""


def _stable_int(*parts: Any) -> int:
  return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "big")


def _segment(rng: random.Random, skill: str, family: str, lo: int, hi: int,
             ) -> dict[str, Any]:
  """Samples distinct items of `family` on which `skill` visibly acts."""
  words = FAMILIES[family]
  while True:
    items = rng.sample(words, rng.randint(lo, hi))
    output = SKILLS[skill](items)
    if skill == COPY_WORD or output != items:
      return {"skill": skill, "family": family, "items": items, "output": output}


def _render(segments: Sequence[Mapping[str, Any]], key: str) -> str:
  parts = []
  for s in segments:
    words = ([s["skill"]] + list(s["items"])) if key == "inputs" else list(s["output"])
    parts.append(" ".join(words))
  return f" {SEPARATOR} ".join(parts)


def _expert_example(rng: random.Random, e: ExpertSkill, copy_prob: float):
  segs = [_segment(rng, e.skill, e.family, 2, e.max_items)]
  segs[0]["expert"] = e.name
  if rng.random() < copy_prob:
    other = rng.choice([f for f in FAMILIES if f != e.family])
    copy = _segment(rng, COPY_WORD, other, 2, 3)
    copy["expert"] = None
    segs.insert(rng.randint(0, 1), copy)
  return segs


def _heldout_segments(rng: random.Random, h: HeldOutSpec):
  chosen = rng.sample(SYNTHETIC_EXPERT_TASKS, h.num_segments)
  segs = []
  for name in chosen:
    e = EXPERTS[name]
    hi = min(h.max_items, 3 if e.skill == "double" else h.max_items)
    seg = _segment(rng, e.skill, e.family, 2, hi)
    seg["expert"] = name
    segs.append(seg)
  return segs


def _choices(rng: random.Random, segs, num_choices: int):
  """Correct target + distractors with one segment given a wrong skill."""
  correct = _render(segs, "targets")
  pool = []
  for i, s in enumerate(segs):
    for skill in SKILLS:
      if skill == s["skill"]:
        continue
      wrong = [dict(x) for x in segs]
      wrong[i]["output"] = SKILLS[skill](s["items"])
      text = _render(wrong, "targets")
      if text != correct and text not in pool and len(text.split()) <= 12:
        pool.append(text)
  if len(pool) < num_choices - 1:
    return None
  choices = rng.sample(pool, num_choices - 1) + [correct]
  rng.shuffle(choices)
  return choices, choices.index(correct)


def generate_examples(task_name: str, split: str = "train", n: int = 100,
                      seed: int = 0, copy_prob: float = 0.5) -> list[dict[str, Any]]:
  """Generates `n` deterministic examples of a synthetic task.

  Args:
    task_name: one of SYNTHETIC_EXPERT_TASKS or SYNTHETIC_HELDOUT_TASKS (a
      leading "synthetic_" is accepted).
    split: "train", "validation" or "test" (disjoint by input hash).
    n: number of examples.
    seed: generation seed; (task, split, seed) fixes the rows.
    copy_prob: expert tasks only: chance of an extra `copy` segment.

  Returns:
    Dicts with 'inputs', 'targets', 'segments' (construction info: per segment
    skill, family, items, output, expert) and, for choice tasks,
    'answer_choices' (4 strings) and 'label' (index of the correct one).
  """
  name = task_name[len("synthetic_"):] if task_name.startswith("synthetic_") else task_name
  if name not in EXPERTS and name not in HELDOUT:
    raise SyntheticTaskError(
        f"unknown synthetic task {task_name!r}; expected one of "
        f"{SYNTHETIC_EXPERT_TASKS + SYNTHETIC_HELDOUT_TASKS}")
  if split not in _SPLIT_BUCKETS:
    raise SyntheticTaskError(f"unknown split {split!r}; expected {SPLITS}")
  if n < 0:
    raise SyntheticTaskError(f"n must be >= 0, got {n}")
  rng = random.Random(_stable_int("phatgoose_jax.synthetic", name, split, seed))
  out: list[dict[str, Any]] = []
  attempts = 0
  while len(out) < n:
    attempts += 1
    if attempts > 200 * (n + 10):
      raise SyntheticTaskError(f"{name}: could not draw {n} {split} examples (the split's "
                               "inputs, or held-out choices, kept being rejected)")
    if name in EXPERTS:
      segs = _expert_example(rng, EXPERTS[name], copy_prob)
      h = None
    else:
      h = HELDOUT[name]
      segs = _heldout_segments(rng, h)
    inputs = _render(segs, "inputs")
    if _stable_int("split", inputs) % 10 not in _SPLIT_BUCKETS[split]:
      continue
    ex = {"inputs": inputs, "targets": _render(segs, "targets"), "segments": segs}
    if h is not None and h.num_choices:
      picked = _choices(rng, segs, h.num_choices)
      if picked is None:
        continue
      ex["answer_choices"], ex["label"] = picked
    out.append(ex)
  return out


def synthetic_corpus(n: int = 2000, seed: int = 0) -> list[str]:
  """Text for vocabulary training and brief LM pretraining (no task solutions).

  Starts with every family in its canonical order and every skill word (so a
  vocabulary covers the whole lexicon), then `n` random lines mixing skill
  words, family words and the separator; every 10th line is a canonical
  family run (teaches the order that `next`/`sort` rely on).
  """
  rng = random.Random(_stable_int("phatgoose_jax.corpus", seed))
  lines = [" ".join(ws) for ws in FAMILIES.values()]
  lines.append(" ".join(list(SKILLS) + [SEPARATOR]))
  fams = list(FAMILIES)
  for i in range(n):
    if i % 10 == 0:
      fam = FAMILIES[rng.choice(fams)]
      start = rng.randrange(len(fam))
      k = rng.randint(3, len(fam))
      lines.append(" ".join(fam[(start + j) % len(fam)] for j in range(k)))
      continue
    words = []
    for s in range(rng.randint(1, 2)):
      if s:
        words.append(SEPARATOR)
      words.append(rng.choice(list(SKILLS)))
      words.extend(rng.sample(FAMILIES[rng.choice(fams)], rng.randint(2, 4)))
    lines.append(" ".join(words))
  return lines


def _task_source(name: str, num_examples: Mapping[str, int], seed: int,
                 copy_prob: float):
  import seqio  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  gen_seed = seed

  def dataset_fn(split: str, shuffle_files: bool, seed: Optional[int] = None):
    del shuffle_files, seed  # Rows are fixed by `gen_seed`; seqio shuffles.
    rows = generate_examples(name, split, num_examples[split], gen_seed, copy_prob)
    cols: dict[str, Any] = {"inputs": [r["inputs"] for r in rows],
                            "targets": [r["targets"] for r in rows]}
    if rows and "answer_choices" in rows[0]:
      cols["answer_choices"] = [r["answer_choices"] for r in rows]
      cols["label"] = [r["label"] for r in rows]
    return tf.data.Dataset.from_tensor_slices(cols)
  return seqio.FunctionDataSource(dataset_fn, splits=list(num_examples),
                                  num_input_examples=dict(num_examples))


def register_synthetic_tasks(vocabulary, prefix: str = "synthetic_",
                             num_examples: Optional[Mapping[str, int]] = None,
                             seed: int = 0, copy_prob: float = 0.5,
                             mixture_name: Optional[str] = None) -> list[str]:
  """Registers one seqio Task per synthetic task plus the expert mixture.

  Idempotent: existing tasks/mixture of the same names are removed first.
  Generative tasks report exact-match accuracy; the choice task is expanded
  by `rank_classification` (one row per choice, `idx`, `is_correct`) and
  reports rank-classification accuracy from scores.

  Args:
    vocabulary: a seqio vocabulary for both `inputs` and `targets`.
    prefix: task name prefix.
    num_examples: split -> number of rows (default train 2000, validation /
      test 200).
    seed: generation seed.
    copy_prob: see `generate_examples`.
    mixture_name: the mixture of all expert tasks (default
      f"{prefix}multitask").

  Returns:
    The registered names (tasks, then the mixture).
  """
  import seqio  # pylint: disable=g-import-not-at-top
  num_examples = dict(num_examples or {"train": 2000, "validation": 200, "test": 200})
  bad = [s for s in num_examples if s not in _SPLIT_BUCKETS]
  if bad:
    raise SyntheticTaskError(f"num_examples has unknown split(s) {bad}; expected {SPLITS}")
  features = {
      "inputs": seqio.Feature(vocabulary, add_eos=True, required=False),
      "targets": seqio.Feature(vocabulary, add_eos=True),
  }
  names = []
  for name in SYNTHETIC_EXPERT_TASKS + SYNTHETIC_HELDOUT_TASKS:
    is_choice = name in HELDOUT and HELDOUT[name].num_choices > 0
    preprocessors = ([prep.rank_classification] if is_choice else []) + [
        seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim]
    full = prefix + name
    if full in seqio.TaskRegistry.names():
      seqio.TaskRegistry.remove(full)
    seqio.TaskRegistry.add(
        full,
        source=_task_source(name, num_examples, seed, copy_prob),
        preprocessors=preprocessors,
        output_features=features,
        postprocess_fn=prep.rank_classification_postprocessor if is_choice else None,
        metric_fns=[prep.rank_classification_accuracy if is_choice
                    else prep.exact_match_accuracy],
        # One split's worth: a larger buffer over repeated data only slows the
        # first batch (seqio shuffles after `repeat`).
        shuffle_buffer_size=min(10_000, max(num_examples.values())))
    names.append(full)
  mixture_name = mixture_name or f"{prefix}multitask"
  if mixture_name in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove(mixture_name)
  seqio.MixtureRegistry.add(
      mixture_name, [prefix + n for n in SYNTHETIC_EXPERT_TASKS], default_rate=1.0)
  return names + [mixture_name]


@gin.configurable(module="phatgoose_jax.data.synthetic")
def task_module(vocabulary=gin.REQUIRED,
                num_examples: Optional[Mapping[str, int]] = None) -> str:
  """Registers the synthetic tasks with ``vocabulary`` and returns this module's name, for
  ``MIXTURE_OR_TASK_MODULE = @phatgoose_jax.data.synthetic.task_module()`` (`gin/data/
  synthetic.gin`): training and evaluation both read that macro after gin is parsed."""
  if vocabulary is gin.REQUIRED or vocabulary is None:
    raise SyntheticTaskError("synthetic.task_module: vocabulary is not set (VOCABULARY / "
                             "VOCABULARY_PATH)")
  register_synthetic_tasks(vocabulary, num_examples=num_examples)
  return __name__
