"""A checkpoint's saved data-stream position is checked on resume: the stream is a pure function of
(seed, batch size, split, step), so a change to any of them is refused by name."""

import pytest

from at_jax.errors import ConfigError
from at_jax.experiment import runs, stream


def test_check_position_refuses_another_seed(tiny_config, tmp_path):
  def run(seed):  # a real Run of the shrunk demo: nothing is compiled
    c = tiny_config(steps=4, mode="none")
    c.seed = seed
    return runs.setup(c, str(tmp_path))

  first, other = run(0), run(1)
  saved = stream.position(first, 3)
  stream.check_position(first, saved)  # the same stream resumes
  with pytest.raises(ConfigError) as e:
    stream.check_position(other, saved)
  assert e.value.field == "seed" and "seed=0" in e.value.message
