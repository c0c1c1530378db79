"""BIG-bench Hard (22 tasks) and BIG-bench Lite (17 tasks) as PHATGOOSE runs them.

Pure data. Paper: Muqeeth et al., ICML 2024, Sec. 4.1 (FLAN setting evaluation).

Sources (repository: path): r-three/phatgoose `colm/datasets/bigbench.gin`
(HF dataset, split, interface, metric per task), `colm/experiments/eval.gin`
(`P/EVALUATE/BBH` 22 tasks, `P/EVALUATE/BBLITE` 17 tasks), and
`src/data/bigbench.py` (input is `inputs + "\\nAnswer:"`; multiple-choice tasks
are scored by rank classification over `multiple_choice_targets`; generative
targets use the longest reference).

Notes on what the official code evaluates:
  * BBH: `dyck_languages` is configured but not in the evaluated list (22 of
    23). Most BBH tasks are read from the *full* BIG-bench task in
    `tasksource/bigbench` (train+validation concatenated, split
    'train_validation'), not from the BBH subset; only boolean_expressions,
    multistep_arithmetic_two and web_of_lies come from `lukaemon/bbh` 'test'.
    `logical_deduction` / `tracking_shuffled_objects` are the whole BIG-bench
    tasks (all object counts), not the 3/5/7 BBH splits.
  * BBL: the 24 BIG-bench Lite tasks are configured; 7 are left out of the
    evaluated list (auto_debugging, code_line_description, emoji_movie,
    language_identification, misconceptions_russian,
    parsinlu_reading_comprehension, symbol_interpretation); the code gives no
    reason (they are the tasks whose text the T5 vocabulary covers poorly:
    code, emoji, Cyrillic, Persian, multilingual; not verified). Two tasks
    (formal_fallacies_syllogisms_negation, logical_deduction) are shared with BBH.
"""

from __future__ import annotations

import dataclasses

from phatgoose_jax.data.catalog.p3 import CatalogLookupError

METRICS = ("accuracy", "accuracy_multiple_ans", "exact_match",
           "exact_match_multiple_ans", "rouge")


@dataclasses.dataclass(frozen=True)
class BigBenchTask:
  """One BIG-bench evaluation task.

  Attributes:
    name: BIG-bench task name (HF config).
    phatgoose_name: official gin scope, e.g. 'BBNAVIGATE'.
    hf_path: 'tasksource/bigbench' or 'lukaemon/bbh'.
    split: 'train_validation' (train+validation concatenated) or 'test'.
    interface: 'mc' (rank classification) or 'gen' (greedy decoding).
    metric: one of METRICS.
    answer_choices: fixed choices for lukaemon/bbh MC tasks, else ().
    max_gen_length: decoding budget for 'gen' tasks.
  """

  name: str
  phatgoose_name: str
  hf_path: str = "tasksource/bigbench"
  split: str = "train_validation"
  interface: str = "mc"
  metric: str = "accuracy"
  answer_choices: tuple[str, ...] = ()
  max_gen_length: int | None = None

  @property
  def is_multiple_choice(self) -> bool:
    return self.interface == "mc"

  @property
  def metric_kind(self) -> str:
    """'rank_classification', 'exact_match' or 'rouge'."""
    if self.interface == "mc":
      return "rank_classification"
    return "rouge" if self.metric == "rouge" else "exact_match"


_BBH = "lukaemon/bbh"

BBH_TASKS: tuple[BigBenchTask, ...] = (
    BigBenchTask("boolean_expressions", "BBBOOLEANEXPRESSIONS", _BBH, "test",
                 answer_choices=("True", "False")),
    BigBenchTask("causal_judgment", "BBCAUSALJUDGEMENT"),
    BigBenchTask("date_understanding", "BBDATEUNDERSTANDING"),
    BigBenchTask("disambiguation_qa", "BBDISAMBIGUATIONQA"),
    BigBenchTask("formal_fallacies_syllogisms_negation", "BBFORMALFALLACIES"),
    BigBenchTask("geometric_shapes", "BBGEOMETRICSHAPES",
                 metric="accuracy_multiple_ans"),
    BigBenchTask("hyperbaton", "BBHYPERBATON"),
    BigBenchTask("logical_deduction", "BBLOGICALDEDUCTION"),
    BigBenchTask("movie_recommendation", "BBMOVIERECOMMENDATION"),
    BigBenchTask("multistep_arithmetic_two", "BBMULTISTEPARITHMETICTWO", _BBH,
                 "test", interface="gen", metric="exact_match",
                 max_gen_length=8),
    BigBenchTask("navigate", "BBNAVIGATE"),
    BigBenchTask("object_counting", "BBOBJECTCOUNTING", interface="gen",
                 metric="exact_match_multiple_ans", max_gen_length=8),
    BigBenchTask("penguins_in_a_table", "BBPENGUINSINATABLE"),
    BigBenchTask("reasoning_about_colored_objects",
                 "BBREASONINGABOUTCOLOREDOBJECTS",
                 metric="accuracy_multiple_ans"),
    BigBenchTask("ruin_names", "BBRUINNAMES"),
    BigBenchTask("salient_translation_error_detection",
                 "BBSALIENTTRANSLATIONERRORDETECTION"),
    BigBenchTask("snarks", "BBSNARKS"),
    BigBenchTask("sports_understanding", "BBSPORTSUNDERSTANDING"),
    BigBenchTask("temporal_sequences", "BBTEMPORALSEQUENCES"),
    BigBenchTask("tracking_shuffled_objects", "BBTRACKINGSHUFFLEDOBJECTS"),
    BigBenchTask("web_of_lies", "BBWEBOFLIES", _BBH, "test",
                 answer_choices=("Yes", "No")),
    BigBenchTask("word_sorting", "BBWORDSORTING", interface="gen",
                 metric="exact_match", max_gen_length=128),
)
BBH_DROPPED = ("dyck_languages",)

_BBH_BY_NAME = {t.name: t for t in BBH_TASKS}

BBL_TASKS: tuple[BigBenchTask, ...] = (
    BigBenchTask("bbq_lite_json", "BBBBQLITEJSON"),
    BigBenchTask("conceptual_combinations", "BBCONCEPTUALCOMBINATIONS"),
    BigBenchTask("conlang_translation", "BBCONLANGTRANSLATION", interface="gen",
                 metric="rouge", max_gen_length=64),
    _BBH_BY_NAME["formal_fallacies_syllogisms_negation"],
    BigBenchTask("hindu_knowledge", "BBHINDUKNOWLEDGE"),
    BigBenchTask("known_unknowns", "BBKNOWNUNKNOWNS"),
    BigBenchTask("linguistics_puzzles", "BBLINGUISTICSPUZZLES", interface="gen",
                 metric="exact_match", max_gen_length=128),
    BigBenchTask("logic_grid_puzzle", "BBLOGICGRIDPUZZLE"),
    _BBH_BY_NAME["logical_deduction"],
    BigBenchTask("novel_concepts", "BBNOVELCONCEPTS",
                 metric="accuracy_multiple_ans"),
    BigBenchTask("operators", "BBOPERATORS", interface="gen",
                 metric="exact_match", max_gen_length=4),
    BigBenchTask("play_dialog_same_or_different", "BBPLAYDIALOGSAMEORDIFFERENT"),
    BigBenchTask("repeat_copy_logic", "BBREPEATCOPYLOGIC", interface="gen",
                 metric="exact_match", max_gen_length=64),
    BigBenchTask("strange_stories", "BBSTRANGESTORIES"),
    BigBenchTask("strategyqa", "BBSTRATEGYQA"),
    BigBenchTask("vitaminc_fact_verification", "BBVITAMINCFACTVERIFICATION"),
    BigBenchTask("winowhy", "BBWINOWHY"),
)
BBL_EXCLUDED = ("auto_debugging", "code_line_description", "emoji_movie",
                "language_identification", "misconceptions_russian",
                "parsinlu_reading_comprehension", "symbol_interpretation")

_SUITES = {"bbh": BBH_TASKS, "bbl": BBL_TASKS}


def all_bbh_names() -> tuple[str, ...]:
  return tuple(t.name for t in BBH_TASKS)


def all_bbl_names() -> tuple[str, ...]:
  return tuple(t.name for t in BBL_TASKS)


def bigbench_task(suite: str, name: str) -> BigBenchTask:
  """Looks up a task of suite 'bbh' or 'bbl' by BIG-bench name."""
  if suite not in _SUITES:
    raise CatalogLookupError(
        f"bigbench catalog: suite must be 'bbh' or 'bbl', got {suite!r}")
  for t in _SUITES[suite]:
    if t.name == name:
      return t
  raise CatalogLookupError(
      f"bigbench catalog: unknown {suite} task {name!r}")
