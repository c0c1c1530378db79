"""P3 catalog: the 36 T0 held-in datasets PHATGOOSE trains one LoRA expert on.

Pure data, no seqio/tf imports. Paper: Muqeeth et al., ICML 2024, Sec. 4.1
("T0 held-in" setting, 36 experts). The official code (r-three/phatgoose) does
not read the published bigscience/P3 dataset; it applies promptsource templates
to the HF datasets itself (`src/data/p3.py`, `colm/datasets/p3_t5xl.gin`). We
name each template by its bigscience/P3 config name, which is what the T0
seqio tasks call it: `<hf_path>[_<hf_config>]_<template name>` with every run
of characters outside `[A-Za-z0-9_.]` replaced by one `_`
(t-zero `t0/seqio_tasks/utils.py::get_task_name`); see `p3_config_name`.

Sources (repository: path):
  * Template/config lists: the `_TASK_TARGET_MAX_TOKENS_DICT` table of the P3
    loading script (a copy of bigscience/P3's `P3.py`, which enumerates every
    published P3 config). `verified=True` means every name below appears there.
  * Dataset list, HF (path, config), eval split/interface/metrics, caps and
    ignore lists: r-three/phatgoose `colm/datasets/p3_t5xl.gin`; expert order:
    r-three/phatgoose `scripts/concatenate.py::p3_dataset_dict`.
  * T0 per-dataset cap: bigscience-workshop/t-zero `t0/seqio_tasks/tasks.py`
    (`MAX_EXAMPLES_PER_DATASET = 500_000`, per-template rate
    `500_000 // num_templates` when the train split is larger).

Three PHATGOOSE datasets are not in P3 (`commonsense_qa`, `hotpot_qa/fullwiki`,
`adversarial_qa/adversarialQA`; T0 used cos_e, kilt_tasks/hotpotqa and the
three adversarial_qa rounds instead). Their template names come from
bigscience-workshop/promptsource `promptsource/templates/...` at one stored
commit and are marked `verified=False`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

# Cap on (example, template) pairs per training dataset in PHATGOOSE
# (`max_examples_per_dataset = 500_000` on every D/P3*/TRAIN in p3_t5xl.gin);
# equal to T0's MAX_EXAMPLES_PER_DATASET in t0/seqio_tasks/tasks.py.
MAX_EXAMPLES_PER_DATASET = 500_000


class CatalogLookupError(ValueError):
  """Raised when a catalog key or field value is unknown or malformed."""


_INVALID_RUN = re.compile(r"[^\w\d\._]+")


def p3_config_name(
    dataset_name: str, subset_name: Optional[str], template_name: str
) -> str:
  """P3 / T0 seqio task name of a promptsource template.

  Args:
    dataset_name: HF dataset path, e.g. 'super_glue'.
    subset_name: HF config, e.g. 'copa', or None.
    template_name: promptsource template name, e.g. '…why? C1 or C2'.

  Returns:
    e.g. 'super_glue_copa__why_C1_or_C2'.
  """
  for field, value in (("dataset_name", dataset_name),
                       ("template_name", template_name)):
    if not isinstance(value, str) or not value:
      raise CatalogLookupError(
          f"p3_config_name: {field} must be a non-empty string, got {value!r}")
  prefix = dataset_name + (f"_{subset_name}_" if subset_name else "_")
  return _INVALID_RUN.sub("_", prefix + template_name)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """One held-in dataset (one PHATGOOSE expert).

  Attributes:
    key: short task key, e.g. 'ag_news'.
    phatgoose_name: the official gin scope, e.g. 'P3AGNEWS'.
    hf_path: HF dataset path.
    hf_config: HF config name or None.
    templates: P3 config names trained on (ignored ones already removed).
    ignored_templates: P3 config names PHATGOOSE drops for train and eval.
    eval_ignored_templates: extra names dropped only at evaluation.
    original_task_templates: templates flagged `original_task` in promptsource
      (None when not collected).
    train_split: split used for training.
    eval_split: split PHATGOOSE evaluates held-in performance on.
    eval_interface: 'mc' (rank classification) or 'gen' (greedy generation).
    eval_metrics: metric names from the official gin.
    eval_max_examples: cap on raw eval examples (before templating), or None.
    eval_all_templates: True where the official eval uses all (non-ignored)
      templates instead of only original-task ones.
    custom_template: True where PHATGOOSE replaces the P3 templates with its
      own single template (TREC); `templates` is then empty.
    all_p3_configs: every published P3 config of the dataset (before ignores).
    verified: every name in `templates`/`all_p3_configs` was found upstream.
    notes: provenance caveats.
  """

  key: str
  phatgoose_name: str
  hf_path: str
  hf_config: Optional[str]
  templates: tuple[str, ...]
  ignored_templates: tuple[str, ...] = ()
  eval_ignored_templates: tuple[str, ...] = ()
  original_task_templates: Optional[tuple[str, ...]] = None
  train_split: str = "train"
  eval_split: str = "validation"
  eval_interface: str = "mc"
  eval_metrics: tuple[str, ...] = ("accuracy",)
  eval_max_examples: Optional[int] = None
  eval_all_templates: bool = False
  custom_template: bool = False
  all_p3_configs: tuple[str, ...] = ()
  verified: bool = True
  notes: str = ""
  max_train_examples: int = MAX_EXAMPLES_PER_DATASET

  @property
  def config_prefix(self) -> str:
    return p3_config_name(self.hf_path, self.hf_config, "x")[:-1]


def _spec(key, name, path, config, suffixes, ignored=(), eval_ignored=(),
          **kw) -> DatasetSpec:
  """Builds a spec from template suffixes; ignores are given as suffixes too."""
  prefix = p3_config_name(path, config, "x")[:-1]
  full = tuple(prefix + s for s in suffixes)
  ign = tuple(prefix + s for s in ignored)
  ev_ign = tuple(prefix + s for s in eval_ignored)
  for n in ign + ev_ign:
    if n not in full:
      raise CatalogLookupError(f"p3.py: ignored template {n!r} not in {key}")
  orig = kw.pop("original_suffixes", None)
  if orig is not None:
    kw["original_task_templates"] = tuple(prefix + s for s in orig)
  custom = kw.get("custom_template", False)
  kept = () if custom else tuple(n for n in full if n not in ign)
  return DatasetSpec(key=key, phatgoose_name=name, hf_path=path,
                     hf_config=config, templates=kept, ignored_templates=ign,
                     eval_ignored_templates=ev_ign, all_p3_configs=full, **kw)


_SENTIMENT10 = (
    "Movie_Expressed_Sentiment", "Movie_Expressed_Sentiment_2",
    "Reviewer_Enjoyment", "Reviewer_Enjoyment_Yes_No",
    "Reviewer_Expressed_Sentiment", "Reviewer_Opinion_bad_good_choices",
    "Reviewer_Sentiment_Feeling", "Sentiment_with_choices_",
    "Text_Expressed_Sentiment", "Writer_Expressed_Sentiment")
_QA_CDQ = (  # shared cosmos_qa / quail name stems
    "context_description_question_answer_id",
    "context_description_question_answer_text",
    "context_description_question_text",
)
_GEN = dict(eval_interface="gen")

# Order = r-three/phatgoose scripts/concatenate.py p3_dataset_dict (expert index).
P3_DATASETS: tuple[DatasetSpec, ...] = (
    _spec("ag_news", "P3AGNEWS", "ag_news", None, (
        "classify", "classify_question_first", "classify_with_choices",
        "classify_with_choices_question_first", "recommend", "which_section",
        "which_section_choices"), eval_split="test"),
    _spec("amazon_polarity", "P3AMAZONPOLARITY", "amazon_polarity", None, (
        "Is_this_product_review_positive", "Is_this_review",
        "Is_this_review_negative", "User_recommend_this_product",
        "convey_negative_or_positive_sentiment", "flattering_or_not",
        "negative_or_positive_tone", "user_satisfied", "would_you_buy"),
          eval_split="test", eval_max_examples=10_000),
    _spec("cosmos_qa", "P3COSMOSQA", "cosmos_qa", None, (
        "context_answer_to_question",) + _QA_CDQ + (
        "context_question_description_answer_id",
        "context_question_description_answer_text",
        "context_question_description_text",
        "description_context_question_answer_id",
        "description_context_question_answer_text",
        "description_context_question_text", "no_prompt_id", "no_prompt_text",
        "only_question_answer")),
    _spec("samsum", "P3SAMSUM", "samsum", None, (
        "Generate_a_summary_for_this_dialogue",
        "Given_the_above_dialogue_write_a_summary",
        "Sum_up_the_following_dialogue", "Summarize_", "Summarize_this_dialogue_",
        "To_sum_up_this_dialog", "Write_a_dialogue_that_match_this_summary"),
          eval_metrics=("rouge",), **_GEN),
    _spec("quartz", "P3QUARTZ", "quartz", None, (
        "answer_question_based_on", "answer_question_below",
        "given_the_fact_answer_the_q", "having_read_above_passage",
        "paragraph_question_plain_concat", "read_passage_below_choose",
        "use_info_from_paragraph_question", "use_info_from_question_paragraph")),
    _spec("ropes", "P3ROPES", "ropes", None, (
        "background_new_situation_answer", "background_situation_middle",
        "given_background_situation", "new_situation_background_answer",
        "plain_background_situation", "plain_bottom_hint", "plain_no_background",
        "prompt_beginning", "prompt_bottom_hint_beginning",
        "prompt_bottom_no_hint", "prompt_mix", "read_background_situation"),
          eval_metrics=("squad",), **_GEN),
    _spec("wiki_bio", "P3WIKIBIO", "wiki_bio", None, (
        "comprehension", "guess_person", "key_content", "what_content", "who"),
          eval_split="val", eval_metrics=("bleu", "rouge"),
          eval_max_examples=10_000, **_GEN),
    _spec("paws", "P3PAWS", "paws", "labeled_final", (
        "Concatenation", "Concatenation_no_label", "Meaning",
        "Meaning_no_label", "PAWS_ANLI_GPT3", "PAWS_ANLI_GPT3_no_label",
        "Rewrite", "Rewrite_no_label", "context_question",
        "context_question_no_label", "paraphrase_task",
        "task_description_no_label"), ignored=("paraphrase_task",)),
    _spec("wiki_qa", "P3WIKIQA", "wiki_qa", None, (
        "Decide_good_answer", "Direct_Answer_to_Question",
        "Generate_Question_from_Topic", "Is_This_True_", "Jeopardy_style",
        "Topic_Prediction_Answer_Only", "Topic_Prediction_Question_Only",
        "Topic_Prediction_Question_and_Answer_Pair", "automatic_system",
        "exercise", "found_on_google"), ignored=(
            "Direct_Answer_to_Question", "Generate_Question_from_Topic",
            "Jeopardy_style", "Topic_Prediction_Answer_Only",
            "Topic_Prediction_Question_Only",
            "Topic_Prediction_Question_and_Answer_Pair")),
    _spec("social_i_qa", "P3SOCIALIQA", "social_i_qa", None, (
        "Check_if_a_random_answer_is_valid_or_not", "Generate_answer",
        "Generate_the_question_from_the_answer", "I_was_wondering",
        "Show_choices_and_generate_answer", "Show_choices_and_generate_index"),
          eval_ignored=("Check_if_a_random_answer_is_valid_or_not",)),
    _spec("qasc", "P3QASC", "qasc", None, (
        "is_correct_1", "is_correct_2", "qa_with_combined_facts_1",
        "qa_with_separated_facts_1", "qa_with_separated_facts_2",
        "qa_with_separated_facts_3", "qa_with_separated_facts_4",
        "qa_with_separated_facts_5")),
    _spec("quail", "P3QUAIL", "quail", None, _QA_CDQ + (
        "context_question_answer_description_id",
        "context_question_answer_description_text",
        "context_question_description_answer_id",
        "context_question_description_answer_text",
        "context_question_description_text",
        "description_context_question_answer_id",
        "description_context_question_answer_text",
        "description_context_question_text", "no_prompt_id",
        "no_prompt_text")),
    _spec("dream", "P3DREAM", "dream", None, (
        "answer_to_dialogue", "baseline", "generate_first_utterance",
        "generate_last_utterance",
        "read_the_following_conversation_and_answer_the_question"),
          eval_max_examples=500_000),
    _spec("wiqa", "P3WIQA", "wiqa", None, (
        "does_the_supposed_perturbation_have_an_effect",
        "effect_with_label_answer", "effect_with_string_answer",
        "what_is_the_final_step_of_the_following_process",
        "what_is_the_missing_first_step",
        "what_might_be_the_first_step_of_the_process",
        "what_might_be_the_last_step_of_the_process",
        "which_of_the_following_is_the_supposed_perturbation")),
    _spec("quarel", "P3QUAREL", "quarel", None, (
        "choose_between", "do_not_use", "heres_a_story", "logic_test",
        "testing_students"), eval_all_templates=True),
    _spec("sciq", "P3SCIQ", "sciq", None, (
        "Direct_Question", "Direct_Question_Closed_Book_", "Multiple_Choice",
        "Multiple_Choice_Closed_Book_", "Multiple_Choice_Question_First")),
    _spec("quoref", "P3QUOREF", "quoref", None, (
        "Answer_Friend_Question", "Answer_Question_Given_Context",
        "Answer_Test", "Context_Contains_Answer", "Find_Answer",
        "Found_Context_Online", "Given_Context_Answer_Question", "Guess_Answer",
        "Guess_Title_For_Context", "Read_And_Extract_", "What_Is_The_Answer"),
          eval_metrics=("squad",), **_GEN),
    _spec("duorc_paraphrase_rc", "P3DUORC", "duorc", "ParaphraseRC", (
        "answer_question", "build_story_around_qa", "decide_worth_it",
        "extract_answer", "generate_question", "generate_question_by_answer",
        "movie_director", "question_answering", "title_generation"),
          eval_metrics=("squad",), **_GEN),
    _spec("rotten_tomatoes", "P3ROTTENTOMATOES", "rotten_tomatoes", None,
          _SENTIMENT10),
    _spec("yelp_review_full", "P3YELP", "yelp_review_full", None, (
        "based_on_that", "format_rating", "format_score", "format_star",
        "on_a_scale", "so_i_would", "this_place"), eval_split="test"),
    _spec("common_gen", "P3COMMONGEN", "common_gen", None, (
        "Example_prompt", "Given_concepts_type_1", "Given_concepts_type_2",
        "Put_together", "choice_in_concept_centric_sentence_generation",
        "random_task_template_prompt", "sentence_to_concepts",
        "topic_to_sentence", "topics_from_the_sentence"),
          eval_metrics=("bleu", "rouge"), **_GEN),
    _spec("gigaword", "P3GIGAWORD", "gigaword", None, (
        "TLDR", "first_sentence_title", "generate_summary_for_this",
        "in_a_nutshell", "make_a_title", "reverse_writing",
        "write_a_title_for_this_sentence", "write_an_article",
        "write_its_sentence"), eval_metrics=("bleu", "rouge"),
          eval_max_examples=10_000, **_GEN),
    _spec("xsum", "P3XSUM", "xsum", None, (
        "DOC_boils_down_to_simple_idea_that",
        "DOC_given_above_write_one_sentence",
        "DOC_how_would_you_rephrase_few_words", "DOC_tldr",
        "DOC_write_summary_of_above", "article_DOC_summary",
        "college_roommate_asked_DOC_so_I_recap",
        "read_below_DOC_write_abstract", "summarize_DOC",
        "summarize_this_DOC_summary"), eval_metrics=("bleu", "rouge"), **_GEN),
    _spec("glue_mrpc", "P3MRPC", "glue", "mrpc", (
        "equivalent", "generate_paraphrase", "generate_sentence", "paraphrase",
        "replace", "same_thing", "want_to_know")),
    _spec("glue_qqp", "P3QQP", "glue", "qqp", (
        "answer", "duplicate", "duplicate_or_not", "meaning", "quora",
        "same_thing"), eval_max_examples=10_000),
    _spec("commonsense_qa", "P3COMMONSENSEQA", "commonsense_qa", None, (
        "answer_given_question_without_options", "question_answering",
        "question_to_answer_index", "most_suitable_answer",
        "answer_to_question"), original_suffixes=(
            "answer_given_question_without_options", "question_answering",
            "question_to_answer_index", "most_suitable_answer"),
          eval_max_examples=10_000, verified=False,
          notes="Not a P3 dataset. Template names from bigscience-workshop/"
          "promptsource promptsource/templates/commonsense_qa/templates.yaml "
          "at commit 908769cd; an older stored version used other names."),
    _spec("cos_e", "P3COSE", "cos_e", "v1.11", (
        "aligned_with_common_sense", "description_question_option_id",
        "description_question_option_text", "explain_why_human",
        "generate_explanation_given_text", "i_think",
        "question_description_option_id", "question_description_option_text",
        "question_option_description_id", "question_option_description_text",
        "rationale"), eval_max_examples=10_000),
    _spec("wiki_hop", "P3WIKIHOP", "wiki_hop", "original", (
        "choose_best_object_affirmative_1", "choose_best_object_affirmative_2",
        "choose_best_object_affirmative_3", "choose_best_object_interrogative_1",
        "choose_best_object_interrogative_2", "explain_relation",
        "generate_object", "generate_subject", "generate_subject_and_object")),
    _spec("hotpot_qa", "P3HOTPOTQA", "hotpot_qa", "fullwiki", (
        "generate_answer_affirmative", "generate_answer_and_explanations",
        "generate_explanations_interrogative", "classify_question_type",
        "generate_title_affirmative", "generate_question",
        "generate_explanations_affirmative", "generate_answer_interrogative"),
          original_suffixes=(
              "generate_answer_affirmative", "generate_answer_and_explanations",
              "generate_explanations_interrogative",
              "generate_explanations_affirmative",
              "generate_answer_interrogative"),
          eval_metrics=("rouge",), verified=False, **_GEN,
          notes="Not a P3 dataset (T0 trained on kilt_tasks/hotpotqa and "
          "blacklisted hotpot_qa templates as too long). Names from "
          "promptsource templates/hotpot_qa/fullwiki/templates.yaml at commit "
          "5758ad07; other stored versions use other names. The official gin "
          "lists metrics ['blue', 'rouge']: the misspelled 'blue' is ignored by "
          "its Scorer, so only ROUGE-L is computed (followed here)."),
    _spec("app_reviews", "P3APPREVIEWS", "app_reviews", None, (
        "categorize_rating_using_review", "convert_to_rating",
        "convert_to_star_rating", "generate_review"),
          eval_ignored=("generate_review", "convert_to_rating",
                        "convert_to_star_rating"),
          eval_split="train", eval_all_templates=True,
          notes="HF has only a train split: PHATGOOSE shuffles it with "
          "RandomState(1234) and keeps the first 10_000 for eval, the rest "
          "for training (src/data/p3.py P3AppReviewsDataset)."),
    _spec("trec", "P3TREC", "trec", None, (
        "fine_grained_ABBR", "fine_grained_ABBR_context_first",
        "fine_grained_DESC", "fine_grained_DESC_context_first",
        "fine_grained_ENTY", "fine_grained_HUM", "fine_grained_HUM_context_first",
        "fine_grained_LOC", "fine_grained_LOC_context_first", "fine_grained_NUM",
        "fine_grained_NUM_context_first", "fine_grained_open",
        "fine_grained_open_context_first", "pick_the_best_descriptor", "trec1",
        "trec2", "what_category_best_describe", "which_category_best_describes"),
          custom_template=True, eval_split="test",
          notes="PHATGOOSE does not use the P3 templates ('P3 templates are "
          "not working for this dataset'); it uses one template of its own over "
          "the 50 fine labels (src/data/p3.py TrecTemplate)."),
    _spec("multi_news", "P3MULTINEWS", "multi_news", None, (
        "distill", "expand_reverse_task_", "summarize", "summary_scenario",
        "synthesize", "what_are_the_key_points"),
          eval_metrics=("bleu", "rouge"), **_GEN),
    _spec("imdb", "P3IMDB", "imdb", None, (
        _SENTIMENT10[:2] + ("Negation_template_for_positive_and_negative",)
        + _SENTIMENT10[2:]), eval_split="test"),
    _spec("adversarial_qa", "P3ADVERSARIALQA", "adversarial_qa",
          "adversarialQA", (
              "generate_question", "tell_what_it_is", "question_context_answer",
              "based_on", "answer_the_following_q"),
          original_suffixes=("tell_what_it_is", "question_context_answer",
                             "based_on", "answer_the_following_q"),
          eval_metrics=("squad",), verified=False, **_GEN,
          notes="P3 only has the dbidaf/dbert/droberta configs, with these "
          "same five template names; the adversarialQA (all rounds) names come "
          "from promptsource templates/adversarial_qa/adversarialQA at commit "
          "b5736daf."),
    _spec("cnn_dailymail", "P3CNNDAILYMAIL", "cnn_dailymail", "3.0.0", (
        "2_or_3_sentences", "generate_story", "news_card_view", "news_stock",
        "news_summary", "spice_up_story", "sum_in_brief", "tldr_summary",
        "write_an_outline"), eval_metrics=("bleu", "rouge"), **_GEN),
    _spec("dbpedia_14", "P3DBPEDIA14", "dbpedia_14", None, (
        "given_a_choice_of_categories_",
        "given_a_list_of_category_what_does_the_title_belong_to",
        "given_list_what_category_does_the_paragraph_belong_to",
        "pick_one_category_for_the_following_text"),
          eval_split="test", eval_max_examples=10_000),
)

# Raw promptsource names behind each ignore (p3_t5xl.gin spells them this way).
IGNORED_PROMPTSOURCE_NAMES: dict[str, tuple[str, ...]] = {
    "paws": ("paraphrase-task",),
    "wiki_qa": ("Direct Answer to Question", "Generate Question from Topic",
                "Jeopardy style", "Topic Prediction - Answer Only",
                "Topic Prediction - Question Only",
                "Topic Prediction - Question and Answer Pair"),
    "social_i_qa": ("Check if a random answer is valid or not",),
    "app_reviews": ("generate_review", "convert_to_rating",
                    "convert_to_star_rating"),
}

_BY_KEY = {d.key: d for d in P3_DATASETS}

# Greedy-decoding budget of each generative dataset's validation: ``max_gen_length`` of its
# ``D/P3<NAME>/EVAL/InterfaceInfo`` in r-three/phatgoose colm/datasets/p3_t5xl.gin (HF generate
# counts the start token: `p3_tasks` decodes at most ``max_gen_length - 1`` tokens).
P3_EVAL_MAX_GEN_LENGTH = {
    "samsum": 128, "ropes": 16, "wiki_bio": 256, "quoref": 32, "duorc_paraphrase_rc": 64,
    "common_gen": 64, "gigaword": 128, "xsum": 256, "hotpot_qa": 64, "multi_news": 256,
    "adversarial_qa": 128, "cnn_dailymail": 128,
}


def all_p3_keys() -> tuple[str, ...]:
  """Keys of the 36 held-in datasets in official expert order."""
  return tuple(d.key for d in P3_DATASETS)


def p3_dataset(key: str) -> DatasetSpec:
  """Looks up a held-in dataset by key (e.g. 'ag_news')."""
  if key not in _BY_KEY:
    raise CatalogLookupError(
        f"p3 catalog: unknown dataset key {key!r}; known: {sorted(_BY_KEY)}")
  return _BY_KEY[key]


def all_p3_templates() -> tuple[str, ...]:
  """Every trained P3 config name over the 36 datasets."""
  return tuple(t for d in P3_DATASETS for t in d.templates)


def t0_mixture_rate(num_train_examples: int, num_templates: int) -> int:
  """T0's per-template mixing rate (t0/seqio_tasks/tasks.py `mixture_cap`).

  Args:
    num_train_examples: size of the dataset's train split.
    num_templates: number of templates of the dataset.

  Returns:
    `MAX // num_templates` if the dataset is larger than MAX, else its size.
  """
  if num_templates <= 0 or num_train_examples < 0:
    raise CatalogLookupError(
        f"t0_mixture_rate: need num_templates > 0 and num_train_examples >= 0,"
        f" got {num_templates}, {num_train_examples}")
  if num_train_examples > MAX_EXAMPLES_PER_DATASET:
    return MAX_EXAMPLES_PER_DATASET // num_templates
  return num_train_examples
