"""Unknown init recipes (model.posemb, model.weight_init, optim.decay_rule) are refused at start-up,
naming the field, before anything compiles: in the student and in the MAE teacher it would pretrain."""

import pytest

from at_jax.errors import ConfigError
from at_jax.experiment import job
from tests.conftest import demo_pretraining_its_teacher


@pytest.mark.parametrize(
  "group,name,value",
  [
    ("model", "posemb", "sincos"),
    ("model", "weight_init", "xavier"),
    ("optim", "decay_rule", "adamw"),
  ],
)
@pytest.mark.parametrize("in_teacher", [False, True])
def test_unknown_recipe_stops_before_compiling(
  tmp_path, no_compiles, group, name, value, in_teacher
):
  prefix = "teacher.pretrain." if in_teacher else ""
  c = demo_pretraining_its_teacher(**{f"{prefix}{group}.{name}": value})
  with no_compiles(), pytest.raises(ConfigError) as e:
    job.run_with_teacher(c, str(tmp_path))
  # The teacher's run config sits at teacher.pretrain: its fields are named in full.
  assert e.value.field == ("teacher.pretrain." if in_teacher else "") + f"{group}.{name}", str(
    e.value
  )
  assert not (tmp_path / "teacher").exists()
