"""Batched rank classification equals a direct per-(example, choice) teacher-forced computation."""
import jax
import numpy as np
import pytest

from phatgoose_jax.evaluation import scoring

E = 5
RNG = np.random.default_rng(0)
# 5 examples (odd batch of 3 -> a padded last batch), 2..4 choices of different lengths. Few
# distinct (input, choice) lengths keep the eager per-shape reference cheap.
INPUTS = [list(RNG.integers(3, 90, size=n)) + [1] for n in (4, 7, 4, 7, 4)]
CHOICES = [[list(RNG.integers(3, 90, size=n)) + [1] for n in lens]
           for lens in ((1, 5), (3, 1, 5), (5, 3, 1, 3), (3, 1), (5, 1, 3))]
# Tolerance of batched (padded, deduplicated) vs direct log-probs under PHATGOOSE routing. The
# fixture's random experts (std 0.5) amplify float32 rounding differences between the padded
# batch and the single example into 8e-4-1.2e-3 in the logits of one example (every backend;
# e.g. pair (4, 0): `dense` 1.2e-3, `cpu_kernel` 8e-4, measured with the same backend in both
# paths). Where that lands in the mean target log-prob is luck: with the former 2e-5 rtol/atol,
# `oracle` / `dense` / `gather` reached 0.55 / 0.58 / 0.65 of the tolerance and the native
# `cpu_kernel` (per token batch-invariant, equal to the oracle at 1e-5 in the routing tests)
# 2.4x (3.3e-4 on pair (4, 0)). A scoring bug (wrong row, pad counted, choice misaligned) moves
# a mean log-prob by O(1).
ROUTED_TOL = 2e-3


def direct_score(model, variables, inputs, choice, site_inputs=None):
  """Mean and sum of log_softmax at the targets (incl. EOS), one (example, choice), no padding."""
  enc = np.asarray([inputs], np.int32)
  tgt = np.asarray([choice], np.int32)
  dec_in = np.zeros_like(tgt)
  dec_in[:, 1:] = tgt[:, :-1]
  variables = {k: v for k, v in variables.items() if k in ("params", "adapters")}
  logits = model.apply(variables, enc, dec_in, tgt, enable_dropout=False,
                       site_inputs=site_inputs)  # [1, T, V]
  logp = np.asarray(jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1))[0]
  ll = logp[np.arange(len(choice)), choice]
  return ll.mean(), ll.sum()


def test_rank_classify_matches_direct_computation(routed):
  model, variables = routed
  res = scoring.rank_classify(model, variables, INPUTS, CHOICES, batch_size=3)
  assert res.scores.shape == (5, 4)
  for i, (inp, chs) in enumerate(zip(INPUTS, CHOICES)):
    want_mean = []
    for j, ch in enumerate(chs):
      mean, total = direct_score(model, variables, inp, ch)
      want_mean.append(mean)
      np.testing.assert_allclose(res.scores[i, j], mean, rtol=ROUTED_TOL, atol=ROUTED_TOL)
      np.testing.assert_allclose(res.sums[i, j], total, rtol=ROUTED_TOL, atol=ROUTED_TOL)
      assert res.lengths[i, j] == len(ch)  # EOS counted, pads not
    assert np.all(np.isneginf(res.scores[i, len(chs):]))  # absent choices never win
    assert res.predictions[i] == int(np.argmax(want_mean))


def test_sum_vs_mean_prediction_differs_on_lengths(routed):
  """Length normalisation matters: scores by sum are the per-token means times the lengths."""
  model, variables = routed
  by_mean = scoring.rank_classify(model, variables, INPUTS, CHOICES, batch_size=3)
  by_sum = scoring.rank_classify(model, variables, INPUTS, CHOICES, batch_size=3,
                                 length_normalize=False)
  finite = np.isfinite(by_mean.scores)
  np.testing.assert_allclose(by_sum.scores[finite], by_mean.scores[finite] * by_mean.lengths[finite],
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(by_sum.predictions, np.argmax(by_sum.scores, -1))


def test_per_example_site_inputs_repeated_per_choice(example_weights_routed):
  model, variables = example_weights_routed
  weights = RNG.dirichlet(np.ones(E), size=len(INPUTS)).astype(np.float32)  # [N, E]
  weights[1] = np.eye(E, dtype=np.float32)[3]  # one-hot = retrieval / oracle routing
  res = scoring.rank_classify(model, variables, INPUTS, CHOICES, batch_size=3,
                              site_inputs={"expert_weights": weights})
  for i, (inp, chs) in enumerate(zip(INPUTS, CHOICES)):
    for j, ch in enumerate(chs):
      mean, _ = direct_score(model, variables, inp, ch, {"expert_weights": weights[i:i + 1]})
      np.testing.assert_allclose(res.scores[i, j], mean, rtol=2e-5, atol=2e-5)
  other = scoring.rank_classify(model, variables, INPUTS, CHOICES, batch_size=3,
                                site_inputs={"expert_weights": np.roll(weights, 1, axis=0)})
  assert not np.allclose(other.scores[np.isfinite(other.scores)],
                         res.scores[np.isfinite(res.scores)])


def test_score_rows_dedup_and_padding_equal_plain_rows(routed):
  """Rows sharing an input (seqio rank-classification layout) score as if encoded separately."""
  model, variables = routed
  enc = np.zeros((7, 12), np.int32)
  tgt = np.zeros((7, 8), np.int32)
  rows = [(0, 0), (0, 1), (2, 0), (2, 1), (2, 2), (4, 0), (4, 1)]
  for r, (i, j) in enumerate(rows):
    enc[r, :len(INPUTS[i])] = INPUTS[i]
    tgt[r, :len(CHOICES[i][j])] = CHOICES[i][j]
  deduped = scoring.score_rows(model, variables, enc, tgt, pad_rows_to=9)
  assert deduped["mean"].shape == (7,)
  for r, (i, j) in enumerate(rows):
    np.testing.assert_allclose(deduped["mean"][r], direct_score(model, variables, INPUTS[i],
                                                                CHOICES[i][j])[0],
                               rtol=ROUTED_TOL, atol=ROUTED_TOL)


def test_no_recompile_across_batches(routed):
  model, variables = routed
  scoring.rank_classify(model, variables, INPUTS, CHOICES, batch_size=3)
  before = scoring._score_rows_jit._cache_size()  # pylint: disable=protected-access
  scoring.rank_classify(model, variables, INPUTS[::-1], CHOICES[::-1], batch_size=3)
  assert scoring._score_rows_jit._cache_size() == before  # pylint: disable=protected-access


def test_bad_inputs_raise_named_errors(routed):
  model, variables = routed
  with pytest.raises(scoring.ScoringError, match="example 1 has no answer choices"):
    scoring.rank_classify(model, variables, INPUTS[:2], [CHOICES[0], []])
  with pytest.raises(scoring.ScoringError, match="expert_weights"):
    scoring.rank_classify(model, variables, INPUTS, CHOICES,
                          site_inputs={"expert_weights": np.ones((2, E))})
  with pytest.raises(scoring.ScoringError, match="choice_tokens"):
    scoring.score_choices(model, variables, np.ones((2, 4)), np.ones((3, 2, 4)))
  with pytest.raises(scoring.ScoringError, match="params"):
    scoring.model_variables({"adapters": {}})
