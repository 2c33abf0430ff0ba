"""Transfer settings: selection parsing, resolving against the models and its errors, the head masks."""

import numpy as np
import pytest

from at_jax.errors import ConfigError
from at_jax.transfer import pairing, spec
from tests.transfer.conftest import S, build_model, resolve_distill


@pytest.mark.parametrize(
  "selection,expected",
  [
    ("all", (0, 1, 2, 3, 4, 5)),
    ("first:2", (0, 1)),
    ("last:2", (4, 5)),
    ("end_layer:-2", (0, 1, 2, 3)),
    ("end_layer:0", (0, 1, 2, 3, 4, 5)),
    ("0,3,5", (0, 3, 5)),
    ([5, 1], (1, 5)),
    ("-1", (5,)),
    ((2,), (2,)),
  ],
)
def test_parse_selection(selection, expected):
  assert pairing.parse_selection(selection, 6, "transfer.layers") == expected


@pytest.mark.parametrize(
  "selection,match",
  [
    ("first:0", "count must be"),
    ("last:7", "count must be"),
    ("6", "out of range"),
    ("end_layer:-6", "end_layer"),
    ("end_layer:1", "end_layer"),
    ("top:3", "use 'all'"),
    ("1,1", "repeated"),
    ([], "selects nothing"),
    ("first:x", "integer"),
    (3, "list of integers"),  # not a list
    ([1.9], "list of integers"),  # would be truncated to 1
    ([True], "list of integers"),
  ],
)
def test_parse_selection_errors(selection, match):
  with pytest.raises(ConfigError, match=match) as e:
    pairing.parse_selection(selection, 6, "transfer.layers")
  assert e.value.field == "transfer.layers"


def test_resolve_errors(setup):
  student, teacher, *_ = setup
  cases = [
    ({"mode": "attend"}, "transfer.mode"),
    ({"what": "qk"}, "transfer.what"),
    ({"source": "disk"}, "transfer.source"),
    ({"heads": "4"}, "transfer.heads"),
    ({"layers": "last:5"}, "transfer.layers"),
    ({"weight": 0.0}, "transfer.weight"),
    ({"mode": "copy", "source": "precomputed"}, "transfer.source"),
    ({"loss_impl": "flash"}, "transfer.loss_impl"),
    ({"loss_impl": "blockwise", "what": "q"}, "transfer.loss_impl"),
    ({"loss_impl": "blockwise", "average": "images"}, "transfer.loss_impl"),
    ({"mode": "copy", "loss_impl": "pallas"}, "transfer.loss_impl"),
  ]
  for cfg, field in cases:
    with pytest.raises(ConfigError) as e:
      resolve_distill(student, teacher, **cfg)
    assert e.value.field == field, cfg
  with pytest.raises(ConfigError, match="heads") as e:
    resolve_distill(student, build_model(num_heads=4))
  assert e.value.field == "transfer.head_map"  # how the counts pair is the fix (test_pairing.py)
  with pytest.raises(
    ConfigError, match="tokens"
  ) as e:  # maps are resampled (test_grids.py), q is not
    resolve_distill(student, build_model(patch_size=8), what="q")
  with pytest.raises(ConfigError, match="does not exist in the teacher"):
    resolve_distill(student, build_model(depth=2), layers="last:1")
  # Drop-path with a teacher of another depth: masks shared by mapped layer (classify.teacher_drop_masks).
  assert resolve_distill(build_model(drop_path=0.1), build_model(depth=5)).teacher_layers == (
    0,
    1,
    2,
    3,
  )
  with pytest.raises(ConfigError, match="widths"):
    resolve_distill(student, build_model(width=64), what="q")


def test_loss_block(setup):
  """`transfer.loss_block`: 0 (auto) or a power of two >= 16, for the streamed losses only."""
  student, teacher, *_ = setup
  assert resolve_distill(student, teacher, loss_impl="blockwise").loss_block == 0
  for block in (16, 64, 256):
    assert (
      resolve_distill(student, teacher, loss_impl="pallas", loss_block=block).loss_block == block
    )
  for block, match in [(8, "power of two"), (48, "power of two"), (-16, "power of two")]:
    with pytest.raises(ConfigError, match=match) as e:
      resolve_distill(student, teacher, loss_impl="blockwise", loss_block=block)
    assert e.value.field == "transfer.loss_block"
  for block in ("64", 64.0, True):
    with pytest.raises(ConfigError, match="int") as e:
      resolve_distill(student, teacher, loss_impl="pallas", loss_block=block)
    assert e.value.field == "transfer.loss_block"
  # "direct" has no blocks: an explicit size there is refused, not ignored.
  for cfg in ({}, {"mode": "copy"}):
    with pytest.raises(ConfigError, match="direct") as e:
      resolve_distill(student, teacher, loss_block=64, **cfg)
    assert e.value.field == "transfer.loss_block"


def test_masks(setup):
  student, teacher, *_ = setup
  transfer = resolve_distill(student, teacher, layers="1,3", heads="1")
  np.testing.assert_array_equal(transfer.head_mask(), [[False, True], [False, True]])
  np.testing.assert_array_equal(transfer.layer_head_mask(), [[0, 0], [0, 1], [0, 0], [0, 1]])


def test_what_the_teacher_hands_over(setup):
  """q and k for distilled maps, the maps themselves for copy and averaging; q/k/v need `want_qkv`."""
  student, teacher, *_ = setup
  cases = [
    ({"mode": "distill"}, ("q", "k"), True),
    ({"mode": "distill", "average": "images"}, ("attn_logits",), False),
    ({"mode": "copy"}, ("attn_logits",), False),
    ({"mode": "copy", "what": "v"}, ("v",), True),
    ({"mode": "none"}, ("attn_logits",), False),
  ]
  for cfg, keys, qkv in cases:
    transfer = spec.resolve(cfg, student, teacher, S)
    assert transfer.target_keys == keys and spec.needs_qkv(transfer) == qkv, cfg
  assert not spec.wants_qkv(("attn_logits",)) and spec.wants_qkv(("q", "k"))


def test_selected_description():
  assert spec.selected((0, 1, 2, 3)) == "0-3"
  assert spec.selected((0, 2, 5)) == "0,2,5"
  assert spec.selected((4,)) == "4"


def test_describe_says_what_differs_from_the_paper():
  student, deep = build_model(), build_model(depth=8, num_heads=4)
  plain = spec.resolve({"mode": "distill"}, student, student, S)
  assert spec.describe(plain) == "distill attn, layers 0-3, heads 0-1, weight 3.0"
  mapped = spec.resolve(
    {"mode": "distill", "layer_map": "uniform", "head_map": "group", "target_temperature": 0.5},
    student,
    deep,
    S,
  )
  assert spec.describe(mapped) == (
    "distill attn, layers 0-3 <- teacher's 1,3,5,7, heads 0-1 (group), weight 3.0, maps at T=0.5"
  )
