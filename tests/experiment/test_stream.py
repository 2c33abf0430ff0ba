"""A checkpoint's saved data-stream position is checked on resume: the stream is a pure function of
(seed, batch size, split, step), so a change to any of them is refused by name."""

import types

import ml_collections
import pytest

from at_jax.errors import ConfigError
from at_jax.experiment import stream


def _run(seed: int):
  """A stand-in for a Run: `position` reads its config, workdir and training source alone."""
  config = ml_collections.ConfigDict(
    {"seed": seed, "data": {"batch_size": 8, "name": "fake", "train_split": "train"}}
  )
  return types.SimpleNamespace(config=config, workdir="/tmp/run", train_source=range(64))


def test_check_position_refuses_another_seed():
  saved = stream.position(_run(seed=0), 3)
  stream.check_position(_run(seed=0), saved)  # the same stream resumes
  with pytest.raises(ConfigError) as e:
    stream.check_position(_run(seed=1), saved)
  assert e.value.field == "seed" and "seed=0" in e.value.message
