"""Tests for at_jax.data.pipeline: exact, resumable, sharded iterators; batch sizes; unreadable records."""

import numpy as np
import pytest

from at_jax.data import options, pipeline, skipping, sources
from at_jax.errors import ConfigError


def test_train_is_deterministic_in_seed(aug, indexed_source, take, assert_batches_equal, train_kw):
  source = indexed_source(40)
  a = take(pipeline.train_iterator(source, **train_kw, **aug), 3)
  b = take(pipeline.train_iterator(source, **train_kw, **aug, num_threads=0), 3)
  assert_batches_equal(a, b)
  c = next(pipeline.train_iterator(source, **{**train_kw, "seed": 4}, **aug))
  assert not np.array_equal(a[0]["label"], c["label"])
  assert not np.array_equal(a[0]["image"], c["image"])


def test_train_resumes_exactly_at_start_step(
  aug, indexed_source, take, assert_batches_equal, train_kw
):
  source = indexed_source(20)  # Resume crosses epoch boundaries.
  fresh = take(pipeline.train_iterator(source, **train_kw, **aug), 7)
  resumed = take(pipeline.train_iterator(source, **train_kw, **aug, start_step=4), 3)
  assert_batches_equal(fresh[4:], resumed)


def test_train_process_slices_concatenate_to_global_batch(aug, indexed_source, take, train_kw):
  source = indexed_source(30)
  whole = take(pipeline.train_iterator(source, **train_kw, **aug), 5)
  parts = [
    take(
      pipeline.train_iterator(
        source, **train_kw, **aug, process_index=p, process_count=2, num_threads=p
      ),
      5,
    )
    for p in range(2)
  ]
  for step, batch in enumerate(whole):
    for key in batch:
      joined = np.concatenate([parts[0][step][key], parts[1][step][key]])
      np.testing.assert_array_equal(joined, batch[key])
  assert parts[0][0]["image"].shape == (4, 16, 16, 3)


def test_train_visits_every_example_once_per_epoch(indexed_source, take, train_kw):
  source = indexed_source(50)
  kw = {**train_kw, "global_batch_size": 10}
  labels = [b["label"] for b in take(pipeline.train_iterator(source, **kw), 10)]
  epoch1, epoch2 = np.concatenate(labels[:5]), np.concatenate(labels[5:])
  assert sorted(epoch1) == list(range(50))
  assert sorted(epoch2) == list(range(50))
  assert not np.array_equal(epoch1, epoch2)
  assert not np.array_equal(epoch1, np.arange(50))  # Actually shuffled.


@pytest.mark.parametrize(
  "aug, field",
  [
    (dict(randaugment="rand-m9-bogus"), "data.randaugment"),
    (dict(randaugment="augmix-m5"), "data.randaugment"),
    (dict(random_erase=1.5), "data.random_erase"),
    (dict(random_erase=-0.1), "data.random_erase"),
  ],
)
def test_train_rejects_bad_augmentation(aug, field, indexed_source, train_kw):
  with pytest.raises(ConfigError) as e:
    pipeline.train_iterator(indexed_source(10), **train_kw, **aug)
  assert e.value.field == field


def test_train_rejects_bad_batch_size(indexed_source, train_kw):
  with pytest.raises(ConfigError) as e:
    pipeline.train_iterator(
      indexed_source(10), **{**train_kw, "global_batch_size": 9}, process_count=2
    )
  assert e.value.field == "data.batch_size"


# ----------------------------------------------------------------------------
# Eval iterator.


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_covers_every_example_once(process_count, indexed_source):
  source = indexed_source(23)
  per_process = [
    list(
      pipeline.eval_iterator(
        source,
        global_batch_size=8,
        image_size=8,
        normalization="unit",
        process_index=p,
        process_count=process_count,
      )
    )
    for p in range(process_count)
  ]
  b = 8 // process_count
  seen = []
  for step in range(3):  # ceil(23 / 8) global batches.
    for p in range(process_count):
      batch = per_process[p][step]
      assert batch["image"].shape == (b, 8, 8, 3)
      assert batch["mask"].dtype == np.bool_
      seen += list(batch["label"][batch["mask"]])
  assert all(len(batches) == 3 for batches in per_process)
  assert seen == list(range(23))  # In order, each once.
  masks = np.concatenate([per_process[p][2]["mask"] for p in range(process_count)])
  np.testing.assert_array_equal(masks, np.arange(8) < 23 - 16)


BAD = {3: "garbage", 7: "truncated", 12: "channels"}


def test_train_skips_unreadable_records(
  aug, capsys, take, assert_batches_equal, train_kw, damaged_source
):
  source = damaged_source(20, BAD)
  batches = take(pipeline.train_iterator(source, **train_kw, **aug), 5)
  labels = np.concatenate([b["label"] for b in batches])  # 40: two epochs
  skipped = np.concatenate([b["skipped"] for b in batches])
  assert all(b["image"].shape == (8, 16, 16, 3) for b in batches)
  assert not set(BAD) & set(labels)
  # Each bad record is met once per epoch and replaced once.
  assert skipped.dtype == np.bool_ and skipped.sum() == 2 * len(BAD)
  assert sorted(set(labels[:20])) == sorted(set(range(20)) - set(BAD))
  out = capsys.readouterr().out
  assert "WARNING: example 3 of the source is unreadable" in out
  assert 0 < out.count("WARNING: example") <= skipping.MAX_SKIP_WARNINGS
  # Still a pure function of (seed, step): threads, resume and process
  # slices give the same batches, flags included.
  assert_batches_equal(
    batches, take(pipeline.train_iterator(source, **train_kw, **aug, num_threads=0), 5)
  )
  assert_batches_equal(
    batches[2:], take(pipeline.train_iterator(source, **train_kw, **aug, start_step=2), 3)
  )
  parts = [
    take(pipeline.train_iterator(source, **train_kw, **aug, process_index=p, process_count=2), 5)
    for p in range(2)
  ]
  for step, batch in enumerate(batches):
    for key in batch:
      np.testing.assert_array_equal(
        np.concatenate([parts[0][step][key], parts[1][step][key]]), batch[key]
      )


def test_train_stops_when_no_record_is_readable(train_kw, damaged_source):
  source = damaged_source(5, dict.fromkeys(range(5), "garbage"))
  with pytest.raises(ConfigError, match="5 examples in a row") as e:
    next(pipeline.train_iterator(source, **train_kw, num_threads=0))
  assert e.value.field == "data.name"


def test_eval_leaves_out_unreadable_records(capsys, damaged_source):
  source = damaged_source(20, BAD)
  batches = list(
    pipeline.eval_iterator(source, global_batch_size=8, image_size=8, normalization="unit")
  )
  mask = np.concatenate([b["mask"] for b in batches])
  skipped = np.concatenate([b["skipped"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  assert list(labels[mask]) == [i for i in range(20) if i not in BAD]
  assert list(np.nonzero(skipped)[0]) == sorted(BAD)
  assert not mask[20:].any() and not skipped[20:].any()  # padding
  assert "example 7 of the source is unreadable" in capsys.readouterr().out


@pytest.mark.slow  # a whole training run
def test_train_and_evaluate_counts_skipped_examples(
  tmp_path, monkeypatch, capsys, damaged_source, tiny_config
):
  from at_jax import metrics
  from at_jax.experiment import loop as train

  bad_train = {1: "garbage", 2: "truncated", 40: "garbage"}
  bad_eval = {5: "garbage"}

  def make_source(name, split, data_dir=None, **options):
    del name, data_dir, options
    if split.startswith("train"):
      return damaged_source(64, bad_train, size=28)
    return damaged_source(40, bad_eval, size=28)

  monkeypatch.setattr(sources, "make_source", make_source)
  c = tiny_config(steps=4, mode="none")
  c.data.update(dict(eval_batch_size=40, train_split="train", eval_split="test"))
  evals = train.train_and_evaluate(c, str(tmp_path))  # runs through
  assert 0 <= evals["top1"] <= 100
  lines = [x for x in metrics.read_jsonl(str(tmp_path / "metrics.jsonl")) if "train/loss" in x]
  # 4 steps of 16: one epoch, which meets each bad record once.
  assert lines[-1]["step"] == 4
  assert lines[-1]["train/skipped_examples"] == len(bad_train)
  assert lines[0]["train/skipped_examples"] <= len(bad_train)
  assert "of the source is unreadable" in capsys.readouterr().out


# ----------------------------------------------------------------------------
# Batch sizes, the stream position, and the checks a start-up validation calls.


@pytest.mark.parametrize("batch_size", [0, -8])
def test_batch_size_must_be_positive(batch_size, indexed_source, train_kw):
  with pytest.raises(ConfigError) as e:
    pipeline.check_batch_sizes(batch_size=batch_size, eval_batch_size=8)
  assert e.value.field == "data.batch_size"
  with pytest.raises(ConfigError) as e:
    pipeline.train_iterator(indexed_source(10), **{**train_kw, "global_batch_size": batch_size})
  assert e.value.field == "data.batch_size"


@pytest.mark.parametrize("eval_batch_size", [0, -8])
def test_eval_batch_size_must_be_positive(eval_batch_size, indexed_source):
  with pytest.raises(ConfigError) as e:
    pipeline.check_batch_sizes(batch_size=8, eval_batch_size=eval_batch_size)
  assert e.value.field == "data.eval_batch_size"
  with pytest.raises(ConfigError) as e:
    pipeline.eval_iterator(
      indexed_source(10), global_batch_size=eval_batch_size, image_size=8, normalization="unit"
    )
  assert e.value.field == "data.eval_batch_size"
  with pytest.raises(ConfigError) as e:
    pipeline.eval_example_indices(0, np.ones(4, bool), global_batch_size=eval_batch_size)
  assert e.value.field == "data.eval_batch_size"


def test_batch_size_above_the_training_examples_names_batch_size():
  # One full batch per epoch is enough; eval batches are padded, so any size fits the eval split.
  pipeline.check_batch_sizes(batch_size=16, eval_batch_size=64, num_train_examples=16)
  with pytest.raises(ConfigError) as e:
    pipeline.check_batch_sizes(batch_size=17, eval_batch_size=8, num_train_examples=16)
  assert e.value.field == "data.batch_size"
  assert "16 training examples" in str(e.value)


def test_batch_sizes_must_divide_over_processes():
  pipeline.check_batch_sizes(batch_size=8, eval_batch_size=8, process_count=2)
  with pytest.raises(ConfigError) as e:
    pipeline.check_batch_sizes(batch_size=9, eval_batch_size=8, process_count=2)
  assert e.value.field == "data.batch_size"
  with pytest.raises(ConfigError) as e:
    pipeline.check_batch_sizes(batch_size=8, eval_batch_size=9, process_count=2)
  assert e.value.field == "data.eval_batch_size"


@pytest.mark.parametrize(
  "kw, field",
  [
    (dict(image_size=0), "data.image_size"),
    (dict(normalization="imagenet21k"), "data.normalization"),
    (dict(seed=-1), "seed"),
    (dict(rrc_scale=(0.0, 1.0)), "data.rrc_scale"),
    (dict(rrc_scale=(0.5, 1.5)), "data.rrc_scale"),
    (dict(rrc_scale=(0.9, 0.5)), "data.rrc_scale"),
    (dict(rrc_ratio=(0.0, 1.0)), "data.rrc_scale"),
    (dict(crop_pct=0.0), "data.crop_pct"),
    (dict(crop_pct=1.2), "data.crop_pct"),
    (dict(random_erase=1.5), "data.random_erase"),
    (dict(randaugment="rand-m9-bogus"), "data.randaugment"),
    (dict(fixed_view=True, randaugment="rand-m9"), "data.randaugment"),
    (dict(fixed_view=True, random_erase=0.25), "data.random_erase"),
  ],
)
def test_check_train_args_names_the_field(kw, field, indexed_source, train_kw):
  options.check_train_args(image_size=16, normalization="imagenet")  # the defaults are fine
  with pytest.raises(ConfigError) as e:
    options.check_train_args(**{"image_size": 16, "normalization": "imagenet", **kw})
  assert e.value.field == field
  # The iterator runs the same checks on its own arguments.
  with pytest.raises(ConfigError) as e:
    pipeline.train_iterator(indexed_source(10), **{**train_kw, **kw})
  assert e.value.field == field


@pytest.mark.parametrize(
  "kw, field",
  [
    (dict(image_size=-1), "data.image_size"),
    (dict(crop_pct=0.0), "data.crop_pct"),
    (dict(normalization="imagenet21k"), "data.normalization"),
  ],
)
def test_check_eval_args_names_the_field(kw, field, indexed_source):
  view = dict(image_size=8, crop_pct=0.875, normalization="unit")
  options.check_eval_args(**view)
  with pytest.raises(ConfigError) as e:
    options.check_eval_args(**{**view, **kw})
  assert e.value.field == field
  with pytest.raises(ConfigError) as e:
    pipeline.eval_iterator(indexed_source(4), global_batch_size=2, **{**view, **kw})
  assert e.value.field == field


def test_empty_training_source_names_the_train_split(train_kw):
  empty = sources.ArraySource(np.zeros((0, 8, 8, 3), np.uint8), np.zeros(0))
  with pytest.raises(ConfigError) as e:
    pipeline.train_iterator(empty, **train_kw)
  assert e.value.field == "data.train_split"


def test_stream_position_of_an_array_is_that_of_each_int():
  j = np.arange(40)
  expected = [pipeline.stream_position(int(x), 4, 8, 1) for x in j]
  np.testing.assert_array_equal(pipeline.stream_position(j, 4, 8, 1), expected)
  assert pipeline.stream_position(5, 4, 8, 1) == 8 + 4 + 1  # step 1, process 1's slice, its 2nd


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_example_indices_name_each_batchs_examples(process_count, damaged_source):
  source = damaged_source(23, {4: "garbage"})  # The label is the index.
  seen = []
  for p in range(process_count):
    batches = pipeline.eval_iterator(
      source,
      global_batch_size=8,
      image_size=8,
      normalization="unit",
      process_index=p,
      process_count=process_count,
    )
    for s, batch in enumerate(batches):
      index = pipeline.eval_example_indices(
        s, batch["mask"], global_batch_size=8, process_index=p, process_count=process_count
      )
      assert index.dtype == np.int32 and index.shape == (8 // process_count,)
      np.testing.assert_array_equal(index, np.where(batch["mask"], batch["label"], -1))
      seen += list(index[index >= 0])
  assert sorted(seen) == [i for i in range(23) if i != 4]


def test_process_slices_resume_at_start_step_and_start_batch(indexed_source, take, train_kw):
  """Each process's resumed iterator (train at step k, eval at batch 1) yields its slices of the
  fresh global batches from there: b per process, not the global batch size, per step."""
  source = indexed_source(20)
  fresh = take(pipeline.train_iterator(source, **train_kw), 6)
  view = dict(global_batch_size=8, image_size=8, normalization="unit")
  fresh_eval = list(pipeline.eval_iterator(source, **view))
  assert len(fresh_eval) == 3
  for p in range(2):
    shard = dict(process_index=p, process_count=2)
    resumed = take(pipeline.train_iterator(source, **train_kw, **shard, start_step=3), 3)
    resumed_eval = list(pipeline.eval_iterator(source, **view, **shard, start_batch=1))
    assert len(resumed_eval) == 2
    for whole, part in [*zip(fresh[3:], resumed), *zip(fresh_eval[1:], resumed_eval)]:
      for key in whole:
        np.testing.assert_array_equal(part[key], whole[key][4 * p : 4 * (p + 1)])


@pytest.mark.parametrize("n, global_batch_size", [(16, 8), (8, 8), (12, 4)])
def test_eval_batches_count_is_the_ceiling(n, global_batch_size, indexed_source):
  """A split that fills whole batches gets n / B of them: no batch of padding alone."""
  batches = list(
    pipeline.eval_iterator(
      indexed_source(n), global_batch_size=global_batch_size, image_size=8, normalization="unit"
    )
  )
  assert len(batches) == n // global_batch_size
  assert all(b["mask"].all() for b in batches)
  odd = pipeline.eval_iterator(
    indexed_source(n + 1), global_batch_size=global_batch_size, image_size=8, normalization="unit"
  )
  assert len(list(odd)) == n // global_batch_size + 1
