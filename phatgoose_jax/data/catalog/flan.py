"""FLAN setting catalog: PHATGOOSE's 166 experts, in official expert order.

Pure data. Paper: Muqeeth et al., ICML 2024, Sec. 4.1 (FLAN setting). The
official list is r-three/phatgoose `scripts/concatenate.py::full_dataset_dict`
= p3 (36) + flanv2 (36 Flan2021 tasks) + niv2 (75 NIv2 categories) + add1 (19:
7 more P3 datasets, 4 FLAN Dialog tasks, 8 more Flan2021 tasks). The "add1"
group is the answer to "19 more": it is neither CoT nor T0-SF.

Data: every FLAN expert reads an offline dump made by
`scripts/flan.py` (filter Open-Orca/FLAN `train` on `example['_task_name'] ==
task_name`, saved under `src/datasets_offline/<dataset_path joined by '/'>`).
`colm/datasets/flanv2_t5xl.gin` gives each expert's `dataset_path`, e.g.
`["FLANV2", "Flan2021", "ai2_arc", "ARC-Easy:1.0.0"]`. For Flan2021 and Dialog
experts the `_task_name` is the path after the submix folder joined by '/',
e.g. 'ai2_arc/ARC-Easy:1.0.0' (this naming is the FLAN collection's, seen in
other public lists). NIv2 experts are a whole NIv2 *category* ("Translation",
"Misc."); the per-category `_task_name` lists (task ids like
'task228_arc_answer_generation_easy') are NOT in the official repository and
are not collected here (`verified=False`, empty `task_names`).

Filtering (r-three/phatgoose `src/data/flat.py::FlanDataset`): keep zero-shot
templates only (`_template_type` containing 'zs_opt' or 'zs_noopt'), drop
examples whose inputs or targets are blank, shuffle with
`np.random.RandomState(1234)`, hold out the first `min(10% , 10_000)` as
validation, train on the rest capped at 500_000.
"""

from __future__ import annotations

import dataclasses

from phatgoose_jax.data.catalog.p3 import CatalogLookupError
from phatgoose_jax.data.catalog.p3 import all_p3_keys

FLAN_HF_DATASET = "Open-Orca/FLAN"
ZERO_SHOT_TEMPLATE_TYPES = ("zs_opt", "zs_noopt")
FLAN_SHUFFLE_SEED = 1234
FLAN_MAX_EVAL_EXAMPLES = 10_000
FLAN_EVAL_FRACTION = 0.1
FLAN_MAX_TRAIN_EXAMPLES = 500_000


@dataclasses.dataclass(frozen=True)
class FlanExpertSpec:
  """One expert of the FLAN setting.

  Attributes:
    key: short key ('p3/ag_news', 'flan2021/ai2_arc/ARC-Easy:1.0.0', ...).
    group: 'p3', 'flan2021', 'niv2', 'dialog' (dialog and the extra flan2021
      and p3 experts form the official 'add1' block).
    phatgoose_name: official gin scope, e.g. 'FLAN2021AI2ARCEASY/ZS'.
    dataset_path: official offline path components (None for P3 experts).
    task_names: Open-Orca/FLAN `_task_name` values the expert trains on.
    verified: `task_names` are complete and exact.
  """

  key: str
  group: str
  phatgoose_name: str
  dataset_path: tuple[str, ...] | None
  task_names: tuple[str, ...]
  verified: bool


def _flan2021(name: str, *parts: str) -> FlanExpertSpec:
  return FlanExpertSpec(
      key="flan2021/" + "/".join(parts), group="flan2021",
      phatgoose_name=name + "/ZS", dataset_path=("FLANV2", "Flan2021") + parts,
      task_names=("/".join(parts),), verified=True)


def _dialog(name: str, task: str) -> FlanExpertSpec:
  return FlanExpertSpec(
      key="dialog/" + task, group="dialog", phatgoose_name=name + "/ZS",
      dataset_path=("FLANV2", "Dialog", task), task_names=(task,),
      verified=True)


def _p3(key: str, name: str) -> FlanExpertSpec:
  # P3 experts use promptsource templates, not the FLAN dump (see p3.py).
  return FlanExpertSpec(key="p3/" + key, group="p3", phatgoose_name=name,
                        dataset_path=None, task_names=(), verified=True)


# The 75 NIv2 categories, official order (concatenate.py niv2_dataset_dict;
# spelled as in flanv2_t5xl.gin dataset_path).
NIV2_CATEGORIES: tuple[str, ...] = (
    "Translation", "Program Execution", "Question Generation",
    "Sentiment Analysis", "Text Categorization", "Text Matching",
    "Toxic Language Detection", "Cause Effect Classification",
    "Information Extraction", "Textual Entailment",
    "Wrong Candidate Generation", "Named Entity Recognition",
    "Commonsense Classification", "Fill in The Blank", "Text Completion",
    "Sentence Composition", "Title Generation", "Language Identification",
    "Question Understanding", "Sentence Perturbation",
    "Answerability Classification", "Summarization", "Coreference Resolution",
    "Text Quality Evaluation", "Text to Code", "Paraphrasing",
    "Dialogue Generation", "Question Rewriting", "Word Semantics",
    "Pos Tagging", "Linguistic Probing", "Story Composition",
    "Speaker Identification", "Word Analogy", "Data to Text",
    "Stereotype Detection", "Negotiation Strategy Detection",
    "Dialogue Act Recognition", "Gender Classification",
    "Coherence Classification", "Explanation", "Ethics Classification",
    "Word Relation Classification", "Sentence Ordering", "Answer Verification",
    "Mathematics", "Intent Identification", "Keyword Tagging", "Code to Text",
    "Dialogue State Tracking", "Text Simplification", "Stance Detection",
    "Fact Verification", "Grammar Error Detection", "Section Classification",
    "Number Conversion", "Style Transfer", "Speaker Relation Classification",
    "Irony Detection", "Question Decomposition", "Overlap Extraction",
    "Grammar Error Correction", "Spelling Error Detection",
    "Entity Generation", "Sentence Expansion",
    "Discourse Connective Identification", "Discourse Relation Classification",
    "Poem Generation", "Entity Relation Classification",
    "Punctuation Error Detection", "Spam Classification", "Paper Review",
    "Sentence Compression", "Preposition Prediction", "Misc.")


def _niv2(category: str) -> FlanExpertSpec:
  scope = "NIV2" + "".join(c for c in category.upper() if c.isalnum())
  return FlanExpertSpec(
      key="niv2/" + category, group="niv2", phatgoose_name=scope + "/ZS",
      dataset_path=("FLANV2", "NIV2", category), task_names=(),
      verified=False)


_P3_NAMES = (
    "P3AGNEWS", "P3AMAZONPOLARITY", "P3COSMOSQA", "P3SAMSUM", "P3QUARTZ",
    "P3ROPES", "P3WIKIBIO", "P3PAWS", "P3WIKIQA", "P3SOCIALIQA", "P3QASC",
    "P3QUAIL", "P3DREAM", "P3WIQA", "P3QUAREL", "P3SCIQ", "P3QUOREF", "P3DUORC",
    "P3ROTTENTOMATOES", "P3YELP", "P3COMMONGEN", "P3GIGAWORD", "P3XSUM",
    "P3MRPC", "P3QQP", "P3COMMONSENSEQA", "P3COSE", "P3WIKIHOP", "P3HOTPOTQA",
    "P3APPREVIEWS", "P3TREC", "P3MULTINEWS", "P3IMDB", "P3ADVERSARIALQA",
    "P3CNNDAILYMAIL", "P3DBPEDIA14")

FLAN_EXPERTS: tuple[FlanExpertSpec, ...] = (
    tuple(_p3(k, n) for k, n in zip(all_p3_keys(), _P3_NAMES))
    + (
        _flan2021("FLAN2021AI2ARCEASY", "ai2_arc", "ARC-Easy:1.0.0"),
        _flan2021("FLAN2021AI2ARCCHALLENGE", "ai2_arc", "ARC-Challenge:1.0.0"),
        _flan2021("FLAN2021ALGEBRALINEAR1D", "algebra__linear_1d:1.0.0"),
        _flan2021("FLAN2021BOOLQ", "bool_q:1.0.0"),
        _flan2021("FLAN2021COQA", "coqa:1.0.0"),
        _flan2021("FLAN2021DEFPRONOUNRESOLUTION",
                  "definite_pronoun_resolution:1.1.0"),
        _flan2021("FLAN2021DROP", "drop:2.0.0"),
        _flan2021("FLAN2021FIXPUNCT", "fix_punct"),
        _flan2021("FLAN2021GEMDART", "gem", "dart:1.1.0"),
        _flan2021("FLAN2021GEME2ENLG", "gem", "e2e_nlg:1.1.0"),
        _flan2021("FLAN2021GEMWEBNLGEN", "gem", "web_nlg_en:1.1.0"),
        _flan2021("FLAN2021GEMWIKILINGUAEN", "gem",
                  "wiki_lingua_english_en:1.1.0"),
        _flan2021("FLAN2021GLUESST2", "glue", "sst2:2.0.0"),
        _flan2021("FLAN2021GLUECOLA", "glue", "cola:2.0.0"),
        _flan2021("FLAN2021GLUEMNLI", "glue", "mnli:2.0.0"),
        _flan2021("FLAN2021GLUEQNLI", "glue", "qnli:2.0.0"),
        _flan2021("FLAN2021GLUESTSB", "glue", "stsb:2.0.0"),
        _flan2021("FLAN2021GLUEWNLI", "glue", "wnli:2.0.0"),
        _flan2021("FLAN2021LAMBADA", "lambada:1.0.0"),
        _flan2021("FLAN2021NATURALQUESTIONSOPEN", "natural_questions_open:1.0.0"),
        _flan2021("FLAN2021NEWSROOM", "newsroom:1.0.0"),
        _flan2021("FLAN2021OPENBOOKQA", "openbookqa:0.1.0"),
        _flan2021("FLAN2021OPINIONABSTRACTSIDEBATE", "opinion_abstracts_idebate"),
        _flan2021("FLAN2021OPINIONABSTRACTSROTTENTOMATOES",
                  "opinion_abstracts_rotten_tomatoes"),
        _flan2021("FLAN2021PARACRAWLENES", "para_crawl_enes"),
        _flan2021("FLAN2021PIQA", "piqa:1.0.0"),
        _flan2021("FLAN2021QUAC", "quac:1.0.0"),
        _flan2021("FLAN2021SENTIMENT140", "sentiment140:1.0.0"),
        _flan2021("FLAN2021SNLI", "snli:1.1.0"),
        _flan2021("FLAN2021SQUAD", "squad", "v2.0:3.0.0"),
        _flan2021("FLAN2021SUPERGLUEMULTIRC", "super_glue", "multirc:1.0.2"),
        _flan2021("FLAN2021SUPERGLUERECORD", "super_glue", "record:1.0.2"),
        _flan2021("FLAN2021TRIVIAQA", "trivia_qa", "rc:1.1.0"),
        _flan2021("FLAN2021TRUECASE", "true_case"),
        _flan2021("FLAN2021UNIFIEDQASCIENCEINST", "unified_qa_science_inst"),
        _flan2021("FLAN2021WORDSEGMENT", "word_segment"),
    )
    + tuple(_niv2(c) for c in NIV2_CATEGORIES)
    + (  # add1_dataset_dict
        _p3("wsc", "P3WSCFIXED"), _p3("copa", "P3COPA"),
        _p3("hellaswag", "P3HSWAG"), _p3("wic", "P3WIC"),
        _p3("race_high", "P3RACEHIGH"), _p3("race_middle", "P3RACEMIDDLE"),
        _p3("web_questions", "P3WEBQUESTIONS"),
        _dialog("DIALOGQRECC", "qrecc"),
        _dialog("DIALOGWIKIDIALOG", "wiki_dialog"),
        _dialog("DIALOGQRECCII", "qrecc_ii"),
        _dialog("DIALOGWIKIDIALOGII", "wiki_dialog_ii"),
        _flan2021("FLAN2021AESLC", "aeslc:1.0.0"),
        _flan2021("FLAN2021WMT16TRANSLATECSEN", "wmt16_translate", "cs-en:1.0.0"),
        _flan2021("FLAN2021WMT16TRANSLATEDEEN", "wmt16_translate", "de-en:1.0.0"),
        _flan2021("FLAN2021WMT16TRANSLATERUEN", "wmt16_translate", "ru-en:1.0.0"),
        _flan2021("FLAN2021WMT16TRANSLATEFIEN", "wmt16_translate", "fi-en:1.0.0"),
        _flan2021("FLAN2021WMT16TRANSLATEROEN", "wmt16_translate", "ro-en:1.0.0"),
        _flan2021("FLAN2021WMT16TRANSLATETREN", "wmt16_translate", "tr-en:1.0.0"),
        _flan2021("FLAN2021WMT14TRANSLATEFREN", "wmt14_translate", "fr-en:1.0.0"),
    )
)

# Extra P3-style experts of the add1 block: HF (path, config) from p3_t5xl.gin.
ADD1_P3_HF: dict[str, tuple[str, str | None]] = {
    "wsc": ("super_glue", "wsc.fixed"), "copa": ("super_glue", "copa"),
    "hellaswag": ("hellaswag", None), "wic": ("super_glue", "wic"),
    "race_high": ("race", "high"), "race_middle": ("race", "middle"),
    "web_questions": ("web_questions", None),
}

_BY_KEY = {e.key: e for e in FLAN_EXPERTS}


def all_flan_keys() -> tuple[str, ...]:
  """The 166 expert keys in official expert-index order."""
  return tuple(e.key for e in FLAN_EXPERTS)


def flan_expert(key: str) -> FlanExpertSpec:
  if key not in _BY_KEY:
    raise CatalogLookupError(
        f"flan catalog: unknown expert key {key!r} (e.g. 'flan2021/drop:2.0.0',"
        f" 'niv2/Translation', 'p3/ag_news')")
  return _BY_KEY[key]


def flan_experts_in_group(group: str) -> tuple[FlanExpertSpec, ...]:
  groups = {e.group for e in FLAN_EXPERTS}
  if group not in groups:
    raise CatalogLookupError(
        f"flan catalog: unknown group {group!r}; known: {sorted(groups)}")
  return tuple(e for e in FLAN_EXPERTS if e.group == group)


def is_zero_shot_template_type(template_type: str) -> bool:
  """True for the `_template_type` values PHATGOOSE keeps ('zs_opt', 'zs_noopt')."""
  if not isinstance(template_type, str):
    raise CatalogLookupError(
        f"flan catalog: _template_type must be a string, got {template_type!r}")
  return any(t in template_type for t in ZERO_SHOT_TEMPLATE_TYPES)


def flan_eval_size(num_examples: int) -> int:
  """Held-out size `min(int(0.1 * n), 10_000)` used by the official split."""
  if num_examples < 0:
    raise CatalogLookupError(
        f"flan_eval_size: num_examples must be >= 0, got {num_examples}")
  return min(int(num_examples * FLAN_EVAL_FRACTION), FLAN_MAX_EVAL_EXAMPLES)
