"""Resuming MODEL_DIR with another run's settings is a named ResumeError, checked before the state
is restored: another mode/expert/metric, or adapters of another shape (not Orbax's tree dump)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import training_helpers as F  # noqa: E402
from phatgoose_jax.training import state as state_lib  # noqa: E402

IDENTITY = {"mode": "lora", "mixture_or_task_name": "t", "rank": 3, "scale": 1 / 3,
            "site_pattern": ".*", "expert_path": None}


def _fit(trainer, variables, model_dir, steps, **kw):
  return trainer.fit(trainer.create_state(variables), F.batches(), steps=steps,
                     model_dir=model_dir, checkpoint_every=1, progress=False,
                     handle_signals=False, export=False, **kw)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  _, model, variables = F.make_model("lora")
  trainer = F.make_trainer(model, variables, "lora")
  model_dir = str(tmp_path_factory.mktemp("resume") / "run")
  _fit(trainer, variables, model_dir, 1, run_identity=IDENTITY)
  return trainer, variables, model_dir


@pytest.mark.parametrize("change, field", [
    ({"expert_path": "/other/expert"}, "expert_path"),
    ({"mixture_or_task_name": "u"}, "mixture_or_task_name"),
    ({"rank": 4}, "rank"),
])
def test_changed_identity_is_refused_naming_model_dir_and_field(run, change, field):
  trainer, variables, model_dir = run
  with pytest.raises(state_lib.ResumeError, match=rf"MODEL_DIR {model_dir} .*{field}: saved"):
    _fit(trainer, variables, model_dir, 2, run_identity={**IDENTITY, **change})


def test_changed_best_metric_is_refused(run):
  trainer, variables, model_dir = run
  with pytest.raises(state_lib.ResumeError, match="best_mode: saved 'min', now 'max'"):
    _fit(trainer, variables, model_dir, 2, run_identity=IDENTITY, best_mode="max")


def test_same_identity_resumes(run):
  trainer, variables, model_dir = run
  result = _fit(trainer, variables, model_dir, 2, run_identity=IDENTITY)
  assert result.step == 2


def test_adapters_of_another_shape_give_a_short_named_error(tmp_path):
  _, model, variables = F.make_model("lora")
  trainer = F.make_trainer(model, variables, "lora")
  model_dir = str(tmp_path / "run")
  _fit(trainer, variables, model_dir, 1)
  _, gmodel, gvars = F.make_model("gated_lora")  # other adapter leaves (gates)
  gtrainer = F.make_trainer(gmodel, gvars, "gate")
  with pytest.raises(state_lib.ResumeError, match="cannot be restored into this run.s") as e:
    _fit(gtrainer, gvars, model_dir, 2)
  assert len(str(e.value)) < 1000
