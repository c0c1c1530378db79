"""Report files, routing statistics from a real routing trace, and the routing heatmap PNG."""
import dataclasses
import json

import numpy as np
import pytest

from phatgoose_jax import adapters as ad
from phatgoose_jax.evaluation import report

E = 5


def test_write_report_tables(tmp_path):
  rows = [{"method": "phatgoose", "task": "rte", "score": 60.0},
          {"method": "phatgoose", "task": "cb", "score": 40.0, "num_examples": 56},
          {"method": "merged", "task": "rte", "score": 55.0}]
  paths = report.write_report(str(tmp_path / "run"), rows, title="T0 held-out")
  data = json.loads(open(paths["results"]).read())
  assert data["table"]["phatgoose"] == {"rte": 60.0, "cb": 40.0, "average": 50.0}
  assert data["table"]["merged"]["average"] == 55.0
  assert data["rows"][1]["num_examples"] == 56
  md = open(paths["report"]).read()
  assert "| method | rte | cb | average |" in md
  assert "| phatgoose | 60.0 | 40.0 | 50.0 |" in md
  assert "| merged | 55.0 | - | 55.0 |" in md
  assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".tmp")]
  with pytest.raises(report.ReportError, match="duplicate"):
    report.write_report(str(tmp_path / "x"), rows + rows[:1])
  with pytest.raises(report.ReportError, match="row 0 has no field 'score'"):
    report.write_report(str(tmp_path / "x"), [{"method": "m", "task": "t"}])


def test_numpy_nan_and_inf_are_written_as_null(tmp_path):
  rows = [{"method": "m", "task": "t", "score": 50.0, "extra": np.array([1.0, np.nan]),
           "other": np.float32(np.inf)}]
  paths = report.write_report(str(tmp_path / "run"), rows)
  data = json.loads(open(paths["results"]).read())
  assert data["rows"][0]["extra"] == [1.0, None] and data["rows"][0]["other"] is None


def test_routing_statistics_by_hand():
  idx = np.asarray([[[0, 1], [2, 0], [2, 1]]])  # [B=1, L=3, K=2]
  w = np.asarray([[[0.75, 0.25], [0.5, 0.5], [0.9, 0.1]]])
  stats = report.routing_statistics({"encoder/layers_0/attention/query": (idx, w)}, 3,
                                    encoder_mask=np.asarray([[1, 1, 0]]))
  s = stats["encoder/layers_0/attention/query"]
  assert s["num_tokens"] == 2
  assert s["top1_counts"] == [1, 0, 1]  # the tie at token 1 picks the first listed (expert 2)
  assert s["top1_entropy"] == pytest.approx(np.log(2))
  np.testing.assert_allclose(s["weight_mass"], [0.625, 0.125, 0.25])
  want_tok = (-(0.75 * np.log(0.75) + 0.25 * np.log(0.25)) + np.log(2)) / 2
  assert s["token_entropy"] == pytest.approx(want_tok)


def test_trace_stats_report_and_heatmap(routed, tmp_path):
  model_plain, variables = routed
  tracing = ad.build_model(model_plain.config,
                           dataclasses.replace(model_plain.site_factory.config, trace=True))
  enc = np.asarray([[5, 9, 14, 22, 1, 0], [7, 8, 1, 0, 0, 0]], np.int32)
  tgt = np.asarray([[4, 6, 1], [3, 1, 0]], np.int32)
  trace = report.collect_routing_trace(tracing, variables, {"encoder_input_tokens": enc,
                                                            "decoder_target_tokens": tgt})
  assert set(trace) == set(ad.site_names(model_plain.config))
  idx, w = trace["encoder/layers_1/mlp/wo"]
  assert idx.shape == (2, 6, 2) and w.shape == (2, 6, 2)
  assert set(trace["decoder/layers_0/encoder_decoder_attention/key"][0].shape[:2]) == {2, 6}
  stats = report.routing_statistics(trace, E, encoder_mask=enc > 0, decoder_mask=tgt > 0)
  assert stats["encoder/layers_0/attention/query"]["num_tokens"] == 8
  assert stats["decoder/layers_2/mlp/wi_0"]["num_tokens"] == 5
  assert stats["decoder/layers_0/encoder_decoder_attention/value"]["num_tokens"] == 8
  for s in stats.values():
    assert sum(s["top1_counts"]) == s["num_tokens"]
    assert 0.0 <= s["top1_entropy"] <= np.log(E) + 1e-9
  paths = report.write_report(str(tmp_path), [{"method": "phatgoose", "task": "t", "score": 1.0}],
                              routing_stats=stats, expert_names=[f"e{i}" for i in range(E)])
  data = json.loads(open(paths["results"]).read())
  assert data["routing"]["encoder/layers_0/attention/query"]["num_tokens"] == 8
  assert "## Routing statistics" in open(paths["report"]).read()
  png = tmp_path / "heatmap.png"
  report.plot_routing_heatmap(trace, ["a", "b", "c", "d", "</s>"], str(png), num_experts=E)
  raw = png.read_bytes()
  assert raw[:8] == b"\x89PNG\r\n\x1a\n" and len(raw) > 1000
  import matplotlib.image as mpimg  # pylint: disable=g-import-not-at-top
  assert mpimg.imread(str(png)).ndim == 3
  with pytest.raises(report.ReportError, match="trace=True"):
    report.collect_routing_trace(model_plain, variables, {"encoder_input_tokens": enc,
                                                          "decoder_target_tokens": tgt})
