"""Evaluation room: batched choice scoring, generation, seqio Evaluator glue, reports and plots.

* `scoring`: rank classification, encoder run once per input, jitted with bucketed shapes.
* `generation`: batched greedy decoding (KV cache) and detokenisation.
* `evaluator`: ``seqio.Evaluator`` callables (score_fn / predict_fn / predict_with_aux_fn), the
  in-memory path (`evaluate_choices`, `evaluate_generation`) and score aggregation.
* `report`: ``results.json`` / ``report.md``, routing statistics and the routing heatmap.
"""
from phatgoose_jax.evaluation.evaluator import (EvaluationError, aggregate_scores, dataset_scores,
                                                evaluate_choices, evaluate_generation,
                                                make_predict_fn, make_score_fn,
                                                run_seqio_evaluation)
from phatgoose_jax.evaluation.generation import detokenize, generate_texts, generate_tokens
from phatgoose_jax.evaluation.report import (ReportError, collect_routing_trace,
                                             flatten_routing_trace, plot_routing_heatmap,
                                             routing_statistics, write_report)
from phatgoose_jax.evaluation.scoring import (ChoiceResults, ScoringError, rank_classify,
                                              score_choices, score_rows)

__all__ = [
    "ChoiceResults", "EvaluationError", "ReportError", "ScoringError", "aggregate_scores",
    "collect_routing_trace", "dataset_scores", "detokenize", "evaluate_choices",
    "evaluate_generation", "flatten_routing_trace", "generate_texts", "generate_tokens",
    "make_predict_fn", "make_score_fn", "plot_routing_heatmap", "rank_classify",
    "routing_statistics", "run_seqio_evaluation", "score_choices", "score_rows", "write_report",
]
