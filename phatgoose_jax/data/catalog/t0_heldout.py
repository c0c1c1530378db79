"""T0 held-out evaluation catalog (11 evaluations over 9 datasets).

Pure data. Paper: Muqeeth et al., ICML 2024, Sec. 4.1 (T0 held-out: RTE,
HellaSwag, COPA, WiC, WinoGrande, CB, StoryCloze, ANLI R1/R2/R3, WSC), scored by
rank classification over the answer choices, averaged over templates.

Sources (repository: path):
  * Datasets, splits and the COPA ignore list: r-three/phatgoose
    `colm/datasets/p3_t5xl.gin` (HELDOUT section) and
    `colm/experiments/eval.gin` (`P/EVALUATE/HELDOUT` order).
  * Template names: bigscience-workshop/t-zero `evaluation/template_list.py`
    (RTE, CB, ANLI, WSC, WinoGrande, StoryCloze, WiC); `_score_eval` config
    names: the P3 `_TASK_TARGET_MAX_TOKENS_DICT` (copy of bigscience/P3
    `P3.py`). StoryCloze is absent from that table (manual download); its
    names follow the T0 naming rule and appear in T0 eval lists (e.g. the
    t5x `T5X_T0_EVAL` set), hence `verified=False` for it.
  * Answer-choice counts: the datasets' label spaces.
"""

from __future__ import annotations

import dataclasses

from phatgoose_jax.data.catalog.p3 import CatalogLookupError
from phatgoose_jax.data.catalog.p3 import p3_config_name


@dataclasses.dataclass(frozen=True)
class HeldoutSpec:
  """One held-out evaluation.

  Attributes:
    key: e.g. 'rte', 'anli_r1'.
    phatgoose_name: official gin scope, e.g. 'P3RTE' or 'P3ANLI/R1'.
    hf_path, hf_config: HF dataset.
    split: evaluation split.
    templates: P3 base config names (no suffix) of the evaluated templates.
    num_choices: number of answer choices per example.
    ignored_templates: base names PHATGOOSE drops (COPA only).
    verified: all names found upstream.
    notes: caveats.
  """

  key: str
  phatgoose_name: str
  hf_path: str
  hf_config: str | None
  split: str
  templates: tuple[str, ...]
  num_choices: int
  ignored_templates: tuple[str, ...] = ()
  verified: bool = True
  notes: str = ""

  @property
  def score_eval_configs(self) -> tuple[str, ...]:
    """P3 rank-classification configs, e.g. 'super_glue_rte_GPT_3_style_score_eval'."""
    return tuple(t + "_score_eval" for t in self.templates)


_NLI15 = (
    "GPT-3 style", "MNLI crowdsource", "always/sometimes/never",
    "based on the previous passage", "can we infer",
    "claim true/false/inconclusive", "consider always/sometimes/never",
    "does it follow that", "does this imply", "guaranteed/possible/impossible",
    "guaranteed true", "justified in saying", "must be true", "should assume",
    "take the following as truth")
_RTE10 = (
    "GPT-3 style", "MNLI crowdsource", "based on the previous passage",
    "can we infer", "does it follow that", "does this imply", "guaranteed true",
    "justified in saying", "must be true", "should assume")
_COPA12 = (
    "C1 or C2? premise, so/because…", "best_option", "cause_effect", "choose",
    "exercise", "i_am_hesitating", "more likely", "plausible_alternatives",
    "…As a result, C1 or C2?", "…What could happen next, C1 or C2?",
    "…which may be caused by", "…why? C1 or C2")
# r-three/phatgoose p3_t5xl.gin D/P3COPA/EVAL ignore_templates.
COPA_IGNORED = ("…which may be caused by", "…What could happen next, C1 or C2?",
                "…As a result, C1 or C2?", "…why? C1 or C2")


def _names(path, config, templates, suffix=""):
  return tuple(p3_config_name(path, config, t) + suffix for t in templates)


def _anli(r: int) -> "HeldoutSpec":
  return HeldoutSpec(
      key=f"anli_r{r}", phatgoose_name=f"P3ANLI/R{r}", hf_path="anli",
      hf_config=None, split=f"dev_r{r}",
      templates=_names("anli", None, _NLI15, f"_r{r}"), num_choices=3)


# Order = r-three/phatgoose colm/experiments/eval.gin P/EVALUATE/HELDOUT.
T0_HELDOUT: tuple[HeldoutSpec, ...] = (
    HeldoutSpec("rte", "P3RTE", "super_glue", "rte", "validation",
                _names("super_glue", "rte", _RTE10), 2),
    HeldoutSpec("hellaswag", "P3HSWAG", "hellaswag", None, "validation", (
        "hellaswag_Predict_ending_with_hint",
        "hellaswag_Randomized_prompts_template",
        "hellaswag_complete_first_then", "hellaswag_if_begins_how_continues"),
                4, notes="The four P3 hellaswag configs with a _score_eval "
                "variant; PHATGOOSE gin says '4 templates' (original task)."),
    HeldoutSpec("copa", "P3COPA", "super_glue", "copa", "validation",
                tuple(n for n in _names("super_glue", "copa", _COPA12)
                      if n not in _names("super_glue", "copa", COPA_IGNORED)),
                2, ignored_templates=_names("super_glue", "copa", COPA_IGNORED),
                notes="T0 evaluated all 12; PHATGOOSE drops the 4 templates "
                "that only render for one question type (8 remain)."),
    HeldoutSpec("wic", "P3WIC", "super_glue", "wic", "validation", _names(
        "super_glue", "wic", (
            "GPT-3-prompt", "GPT-3-prompt-with-label",
            "affirmation_true_or_false", "grammar_homework", "polysemous",
            "question-context", "question-context-meaning",
            "question-context-meaning-with-label", "same_sense",
            "similar-sense")), 2),
    HeldoutSpec("winogrande", "P3WINOGRANDE", "winogrande", "winogrande_xl",
                "validation", _names("winogrande", "winogrande_xl", (
                    "Replace", "does underscore refer to", "fill in the blank",
                    "stand for", "underscore refer to")), 2),
    HeldoutSpec("cb", "P3CB", "super_glue", "cb", "validation",
                _names("super_glue", "cb", _NLI15), 3),
    HeldoutSpec("story_cloze", "P3STORYCLOZE", "story_cloze", "2016", "test",
                _names("story_cloze", "2016", (
                    "Answer Given options", "Choose Story Ending",
                    "Movie What Happens Next", "Novel Correct Ending",
                    "Story Continuation and Options")), 2, verified=False,
                notes="Needs the manually downloaded Story Cloze 2016 data; "
                "PHATGOOSE loads a local copy (src/datasets_offline/story_cloze/"
                "2016) and evaluates its 'test' split."),
    _anli(1), _anli(2), _anli(3),
    HeldoutSpec("wsc", "P3WSCFIXED", "super_glue", "wsc.fixed", "validation",
                _names("super_glue", "wsc.fixed", (
                    "GPT-3 Style", "I think they mean", "Who or what is/are",
                    "by p they mean", "does p stand for",
                    "does the pronoun refer to", "in other words", "p is/are r",
                    "replaced with", "the pronoun refers to")), 2),
)

_BY_KEY = {h.key: h for h in T0_HELDOUT}


def all_heldout_keys() -> tuple[str, ...]:
  return tuple(h.key for h in T0_HELDOUT)


def heldout_dataset(key: str) -> HeldoutSpec:
  """Looks up a held-out evaluation by key (e.g. 'anli_r2')."""
  if key not in _BY_KEY:
    raise CatalogLookupError(
        f"t0_heldout catalog: unknown key {key!r}; known: {sorted(_BY_KEY)}")
  return _BY_KEY[key]
