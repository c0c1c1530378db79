"""Tests for phatgoose_jax.data.catalog (pure-data dataset catalogs)."""

import dataclasses
import subprocess
import sys

import pytest

from phatgoose_jax.data import catalog
from phatgoose_jax.data.catalog import bigbench
from phatgoose_jax.data.catalog import flan
from phatgoose_jax.data.catalog import p3
from phatgoose_jax.data.catalog import t0_heldout

# Independent reference: `_score_eval` configs of the held-out datasets as
# listed in the P3 loading script table (bigscience/P3 P3.py), typed in by hand.
_P3_SCORE_EVAL_REFERENCE = frozenset(
    [f"super_glue_rte_{t}_score_eval" for t in (
        "GPT_3_style", "MNLI_crowdsource", "based_on_the_previous_passage",
        "can_we_infer", "does_it_follow_that", "does_this_imply",
        "guaranteed_true", "justified_in_saying", "must_be_true",
        "should_assume")]
    + [f"super_glue_cb_{t}_score_eval" for t in (
        "GPT_3_style", "MNLI_crowdsource", "always_sometimes_never",
        "based_on_the_previous_passage", "can_we_infer",
        "claim_true_false_inconclusive", "consider_always_sometimes_never",
        "does_it_follow_that", "does_this_imply",
        "guaranteed_possible_impossible", "guaranteed_true",
        "justified_in_saying", "must_be_true", "should_assume",
        "take_the_following_as_truth")]
    + [f"super_glue_copa_{t}_score_eval" for t in (
        "C1_or_C2_premise_so_because_", "_As_a_result_C1_or_C2_",
        "_What_could_happen_next_C1_or_C2_", "_which_may_be_caused_by",
        "_why_C1_or_C2", "best_option", "cause_effect", "choose", "exercise",
        "i_am_hesitating", "more_likely", "plausible_alternatives")]
    + [f"super_glue_wic_{t}_score_eval" for t in (
        "GPT_3_prompt", "GPT_3_prompt_with_label", "affirmation_true_or_false",
        "grammar_homework", "polysemous", "question_context",
        "question_context_meaning", "question_context_meaning_with_label",
        "same_sense", "similar_sense")]
    + [f"super_glue_wsc.fixed_{t}_score_eval" for t in (
        "GPT_3_Style", "I_think_they_mean", "Who_or_what_is_are",
        "by_p_they_mean", "does_p_stand_for", "does_the_pronoun_refer_to",
        "in_other_words", "p_is_are_r", "replaced_with",
        "the_pronoun_refers_to")]
    + [f"winogrande_winogrande_xl_{t}_score_eval" for t in (
        "Replace", "does_underscore_refer_to", "fill_in_the_blank",
        "stand_for", "underscore_refer_to")]
    + [f"hellaswag_{t}_score_eval" for t in (
        "Predict_ending_with_hint", "Randomized_prompts_template",
        "complete_first_then", "if_begins_how_continues")]
    + [f"anli_{t}_r{r}_score_eval" for r in (1, 2, 3) for t in (
        "GPT_3_style", "MNLI_crowdsource", "always_sometimes_never",
        "based_on_the_previous_passage", "can_we_infer",
        "claim_true_false_inconclusive", "consider_always_sometimes_never",
        "does_it_follow_that", "does_this_imply",
        "guaranteed_possible_impossible", "guaranteed_true",
        "justified_in_saying", "must_be_true", "should_assume",
        "take_the_following_as_truth")])


# ---------------------------------------------------------------- P3 ----


def test_p3_has_36_datasets_in_official_order():
  keys = p3.all_p3_keys()
  assert len(keys) == 36
  assert len(set(keys)) == 36
  assert keys[0] == "ag_news" and keys[-1] == "dbpedia_14"
  assert keys.index("trec") == 30  # P3Trec is the 31st expert upstream.


def test_p3_names_unique_across_catalog():
  names = p3.all_p3_templates()
  assert len(names) == len(set(names))
  scopes = [d.phatgoose_name for d in p3.P3_DATASETS]
  assert len(scopes) == len(set(scopes))


def test_p3_template_counts_match_published_p3():
  # Counts of P3 configs per dataset in the P3 table.
  expected = {"ag_news": 7, "amazon_polarity": 9, "cosmos_qa": 13,
              "quail": 13, "paws": 12, "wiki_qa": 11, "ropes": 12,
              "trec": 18, "imdb": 11, "rotten_tomatoes": 10, "cos_e": 11,
              "glue_qqp": 6, "dbpedia_14": 4, "app_reviews": 4}
  for key, n in expected.items():
    assert len(p3.p3_dataset(key).all_p3_configs) == n, key


def test_ignored_templates_never_trained():
  for d in p3.P3_DATASETS:
    assert not set(d.ignored_templates) & set(d.templates), d.key
    assert set(d.ignored_templates) <= set(d.all_p3_configs), d.key
    assert set(d.eval_ignored_templates) <= set(d.all_p3_configs), d.key
  assert "paws_labeled_final_paraphrase_task" not in p3.all_p3_templates()
  assert len(p3.p3_dataset("wiki_qa").templates) == 5
  assert len(p3.p3_dataset("paws").templates) == 11


def test_ignore_lists_match_raw_promptsource_names():
  for key, raw in p3.IGNORED_PROMPTSOURCE_NAMES.items():
    d = p3.p3_dataset(key)
    sanitized = {p3.p3_config_name(d.hf_path, d.hf_config, r) for r in raw}
    assert sanitized == set(d.ignored_templates) | set(
        d.eval_ignored_templates), key


def test_templates_carry_dataset_prefix():
  for d in p3.P3_DATASETS:
    for t in d.all_p3_configs:
      assert t.startswith(d.config_prefix), (d.key, t)


def test_trec_uses_custom_template():
  trec = p3.p3_dataset("trec")
  assert trec.custom_template and trec.templates == ()


def test_unverified_p3_entries_are_exactly_the_non_p3_datasets():
  unverified = {d.key for d in p3.P3_DATASETS if not d.verified}
  assert unverified == {"commonsense_qa", "hotpot_qa", "adversarial_qa"}
  for d in p3.P3_DATASETS:
    if not d.verified:
      assert d.notes


def test_p3_config_name_matches_t0_rule():
  assert p3.p3_config_name("super_glue", "copa", "…which may be caused by") == (
      "super_glue_copa__which_may_be_caused_by")
  assert p3.p3_config_name(
      "super_glue", "copa", "C1 or C2? premise, so/because…") == (
          "super_glue_copa_C1_or_C2_premise_so_because_")
  assert p3.p3_config_name("cos_e", "v1.11", "i_think") == "cos_e_v1.11_i_think"
  assert p3.p3_config_name("ag_news", None, "classify") == "ag_news_classify"


@pytest.mark.parametrize("args", [("", None, "x"), ("ag_news", None, ""),
                                  (None, None, "x")])
def test_p3_config_name_rejects_bad_input(args):
  with pytest.raises(ValueError, match="p3_config_name"):
    p3.p3_config_name(*args)


def test_p3_lookup_errors_name_the_catalog():
  with pytest.raises(catalog.CatalogLookupError, match="p3 catalog.*nope"):
    p3.p3_dataset("nope")
  assert issubclass(catalog.CatalogLookupError, ValueError)


def test_t0_mixture_rate():
  assert p3.t0_mixture_rate(3_600_000, 9) == 55_555
  assert p3.t0_mixture_rate(120_000, 7) == 120_000
  with pytest.raises(ValueError, match="num_templates"):
    p3.t0_mixture_rate(10, 0)


def test_specs_are_frozen():
  with pytest.raises(dataclasses.FrozenInstanceError):
    p3.p3_dataset("ag_news").templates = ()


# -------------------------------------------------------- T0 held-out ----


def test_heldout_has_11_evals_with_3_anli_rounds():
  keys = t0_heldout.all_heldout_keys()
  assert len(keys) == 11 and len(set(keys)) == 11
  anli = [t0_heldout.heldout_dataset(f"anli_r{r}") for r in (1, 2, 3)]
  assert [a.split for a in anli] == ["dev_r1", "dev_r2", "dev_r3"]
  assert all(len(a.templates) == 15 and a.num_choices == 3 for a in anli)


def test_heldout_template_counts_and_choices():
  expected = {"rte": (10, 2), "hellaswag": (4, 4), "copa": (8, 2),
              "wic": (10, 2), "winogrande": (5, 2), "cb": (15, 3),
              "story_cloze": (5, 2), "wsc": (10, 2)}
  for key, (n, c) in expected.items():
    h = t0_heldout.heldout_dataset(key)
    assert (len(h.templates), h.num_choices) == (n, c), key


def test_heldout_score_eval_configs_exist_in_p3():
  for h in t0_heldout.T0_HELDOUT:
    if h.verified:
      missing = set(h.score_eval_configs) - _P3_SCORE_EVAL_REFERENCE
      assert not missing, (h.key, missing)
  assert not any(h.verified for h in t0_heldout.T0_HELDOUT
                 if h.key == "story_cloze")


def test_copa_drops_the_four_filtered_templates():
  copa = t0_heldout.heldout_dataset("copa")
  assert len(copa.ignored_templates) == 4
  assert not set(copa.ignored_templates) & set(copa.templates)
  assert "super_glue_copa__why_C1_or_C2" in copa.ignored_templates


def test_heldout_lookup_error():
  with pytest.raises(ValueError, match="t0_heldout catalog"):
    t0_heldout.heldout_dataset("rte_r1")


# -------------------------------------------------------------- FLAN ----


def test_flan_has_166_experts_in_official_groups():
  keys = flan.all_flan_keys()
  assert len(keys) == 166 and len(set(keys)) == 166
  count = lambda g: len(flan.flan_experts_in_group(g))
  assert (count("p3"), count("flan2021"), count("niv2"), count("dialog")) == (
      43, 44, 75, 4)
  assert keys[0] == "p3/ag_news"
  assert keys[36] == "flan2021/ai2_arc/ARC-Easy:1.0.0"
  assert keys[72] == "niv2/Translation"
  assert keys[147] == "p3/wsc"
  assert keys[-1] == "flan2021/wmt14_translate/fr-en:1.0.0"


def test_flan_scopes_match_official_spelling():
  scopes = {e.phatgoose_name for e in flan.FLAN_EXPERTS}
  assert len(scopes) == 166
  for s in ("NIV2FILLINTHEBLANK/ZS", "NIV2MISC/ZS", "NIV2POSTAGGING/ZS",
            "NIV2TEXTTOCODE/ZS", "FLAN2021SQUAD/ZS", "DIALOGQRECCII/ZS",
            "P3HOTPOTQA", "P3WSCFIXED"):
    assert s in scopes, s


def test_flan_task_names_and_verification():
  arc = flan.flan_expert("flan2021/ai2_arc/ARC-Easy:1.0.0")
  assert arc.task_names == ("ai2_arc/ARC-Easy:1.0.0",)
  assert flan.flan_expert("flan2021/squad/v2.0:3.0.0").task_names == (
      "squad/v2.0:3.0.0",)
  for e in flan.FLAN_EXPERTS:
    if e.group == "niv2":
      assert not e.verified and e.task_names == ()
    else:
      assert e.verified
    if e.group in ("flan2021", "dialog"):
      assert e.task_names == ("/".join(e.dataset_path[2:]),)


def test_flan_filters():
  assert flan.is_zero_shot_template_type("zs_opt")
  assert flan.is_zero_shot_template_type("zs_noopt")
  assert not flan.is_zero_shot_template_type("fs_opt")
  assert not flan.is_zero_shot_template_type("fs_noopt")
  assert flan.flan_eval_size(50_000) == 5_000
  assert flan.flan_eval_size(500_000) == 10_000
  with pytest.raises(ValueError, match="num_examples"):
    flan.flan_eval_size(-1)
  with pytest.raises(ValueError, match="_template_type"):
    flan.is_zero_shot_template_type(None)


def test_flan_lookup_errors():
  with pytest.raises(ValueError, match="flan catalog"):
    flan.flan_expert("niv2/Nope")
  with pytest.raises(ValueError, match="group"):
    flan.flan_experts_in_group("cot")


# ---------------------------------------------------------- BIG-bench ----


def test_bbh_22_tasks_without_dyck():
  names = bigbench.all_bbh_names()
  assert len(names) == 22 and len(set(names)) == 22
  assert "dyck_languages" not in names
  gen = {t.name for t in bigbench.BBH_TASKS if not t.is_multiple_choice}
  assert gen == {"multistep_arithmetic_two", "object_counting", "word_sorting"}
  lukaemon = {t.name for t in bigbench.BBH_TASKS if t.hf_path == "lukaemon/bbh"}
  assert lukaemon == {"boolean_expressions", "multistep_arithmetic_two",
                      "web_of_lies"}
  for t in bigbench.BBH_TASKS:
    assert (t.split == "test") == (t.hf_path == "lukaemon/bbh"), t.name


def test_bbl_17_tasks_and_metric_kinds():
  names = bigbench.all_bbl_names()
  assert len(names) == 17 and len(set(names)) == 17
  assert not set(names) & set(bigbench.BBL_EXCLUDED)
  assert len(set(names) | set(bigbench.BBL_EXCLUDED)) == 24
  assert set(names) & set(bigbench.all_bbh_names()) == {
      "formal_fallacies_syllogisms_negation", "logical_deduction"}
  kinds = {t.name: t.metric_kind for t in bigbench.BBL_TASKS}
  assert kinds["conlang_translation"] == "rouge"
  assert {n for n, k in kinds.items() if k == "exact_match"} == {
      "linguistics_puzzles", "operators", "repeat_copy_logic"}
  assert sum(k == "rank_classification" for k in kinds.values()) == 13
  for t in bigbench.BBH_TASKS + bigbench.BBL_TASKS:
    assert t.metric in bigbench.METRICS
    assert (t.max_gen_length is None) == t.is_multiple_choice


def test_bigbench_lookup():
  assert bigbench.bigbench_task("bbl", "winowhy").phatgoose_name == "BBWINOWHY"
  with pytest.raises(ValueError, match="suite"):
    bigbench.bigbench_task("bbx", "winowhy")
  with pytest.raises(ValueError, match="unknown bbh task"):
    bigbench.bigbench_task("bbh", "winowhy")


# ------------------------------------------------------------- package ----


def test_catalog_imports_no_seqio_or_tensorflow():
  code = ("import sys, phatgoose_jax.data.catalog; "
          "print(sorted(m for m in ('seqio', 'tensorflow') "
          "if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, check=True).stdout.strip()
  assert out == "[]"


def test_flan_gen_lengths_cover_every_non_p3_expert():
  """One official max_gen_length per FLAN2021 / NIv2 / Dialog expert, none for the P3 ones."""
  from phatgoose_jax.data.catalog import FLAN_EVAL_MAX_GEN_LENGTH, FLAN_EXPERTS  # pylint: disable=g-import-not-at-top
  non_p3 = {s.phatgoose_name for s in FLAN_EXPERTS if s.group != "p3"}
  assert set(FLAN_EVAL_MAX_GEN_LENGTH) == non_p3 and len(non_p3) == 123
  assert all(isinstance(v, int) and v in (2, 4, 8, 16, 32, 64, 128, 256, 512)
             for v in FLAN_EVAL_MAX_GEN_LENGTH.values())
  assert FLAN_EVAL_MAX_GEN_LENGTH["FLAN2021DROP/ZS"] == 512
  assert FLAN_EVAL_MAX_GEN_LENGTH["NIV2PAPERREVIEW/ZS"] == 2
