"""Training and evaluation batches without TensorFlow: grain over random-access sources (`sources`).

Training order and augmentation are pure functions of ``(seed, position in the
stream of examples)``, so the iterator's step is its whole state: resuming at
``start_step=k`` reproduces a run that never stopped, whatever the number of
processes or threads. An example that cannot be decoded or augmented (a
corrupt record) is replaced by the next one of the permutation that can, and
flagged ``skipped``; the replacement is a pure function of the same inputs.

Teacher targets written by `at_jax.experiment.precompute` (`target_store.TeacherTargets`) join the
training batches under a fixed view: the eval preprocessing the teacher saw.

The iterators check their arguments with `options`' checks, which a start-up validation calls first.
"""

import functools
import sys
from collections.abc import Callable, Iterator
from typing import Any

import grain
import numpy as np

from at_jax.data import options, skipping, sources, target_store, transforms
from at_jax.data.sources import Source
from at_jax.errors import ConfigError

# ----------------------------------------------------------------------------
# The stream of examples and its batches.


def check_batch_size(
  global_batch_size: int,
  *,
  field: str = "data.batch_size",
  process_count: int = 1,
  num_examples: int | None = None,
) -> None:
  """ConfigError `field` unless a positive multiple of `process_count` and at most `num_examples`.

  Args:
    global_batch_size: B, the batch size summed over processes.
    field: its config field, ``data.batch_size`` or ``data.eval_batch_size``.
    process_count: the processes sharing each global batch.
    num_examples: the training split's size, if given: a larger B leaves an epoch no full batch.
  """
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ConfigError(
      field,
      f"{global_batch_size} must be a positive multiple of the process count {process_count}.",
    )
  if num_examples is not None and global_batch_size > num_examples:
    raise ConfigError(
      field,
      f"{global_batch_size} is more than the {num_examples} training examples "
      "(data.train_split): an epoch would have no full batch.",
    )


def check_batch_sizes(
  *,
  batch_size: int,
  eval_batch_size: int,
  num_train_examples: int | None = None,
  process_count: int = 1,
) -> None:
  """`check_batch_size` of ``data.batch_size`` (against the training split's size, if given) and
  of ``data.eval_batch_size``."""
  check_batch_size(
    batch_size,
    field="data.batch_size",
    process_count=process_count,
    num_examples=num_train_examples,
  )
  check_batch_size(eval_batch_size, field="data.eval_batch_size", process_count=process_count)


def local_batch_size(
  global_batch_size: int, process_index: int, process_count: int, field: str = "data.batch_size"
) -> int:
  """b = B / process_count, this process's share of each global batch (see `check_batch_size`)."""
  if not 0 <= process_index < process_count:
    raise ConfigError("process_index", f"{process_index} is not in [0, {process_count}).")
  check_batch_size(global_batch_size, field=field, process_count=process_count)
  return global_batch_size // process_count


def stream_position(j: Any, b: int, global_batch_size: int, process_index: int) -> Any:
  """Position in the global stream of this process's j-th example (an int, or an int array).

  Global step s is stream positions [s*B, (s+1)*B); process p owns the
  contiguous slice [p*b, (p+1)*b) of it.
  """
  step, k = divmod(j, b)
  return step * global_batch_size + process_index * b + k


def eval_example_indices(
  batch_index: int,
  mask: np.ndarray,
  *,
  global_batch_size: int,
  process_index: int = 0,
  process_count: int = 1,
) -> np.ndarray:
  """The source index of each example of this process's slice of `eval_iterator`'s batch.

  Args:
    batch_index: s, the global batch.
    mask: its ``mask`` [b]: False for padding and unreadable examples.
    global_batch_size, process_index, process_count: as given to `eval_iterator`.

  Returns:
    int32 [b]: the example's index in the source, -1 where `mask` is False.
  """
  b = local_batch_size(global_batch_size, process_index, process_count, "data.eval_batch_size")
  positions = stream_position(batch_index * b + np.arange(b), b, global_batch_size, process_index)
  return np.where(mask, positions, -1).astype(np.int32)


def _batches(
  ds: grain.MapDataset, b: int, num_threads: int, drop_remainder: bool
) -> Iterator[dict[str, np.ndarray]]:
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * b))
  return iter(ds.batch(b, drop_remainder=drop_remainder))


# ----------------------------------------------------------------------------
# Training.


def _shuffled_stream(
  prepare: Callable[[int, int], dict[str, np.ndarray]],
  source: Source,
  seed: int,
  b: int,
  global_batch_size: int,
  process_index: int,
) -> Callable[[int], dict[str, np.ndarray]]:
  """This process's j-th example -> `prepare(index, g)` of the example at its stream position g in
  its epoch's permutation, or of the next readable one (`skipping.first_readable`)."""

  # Threads ask for neighbouring epochs around epoch boundaries; 2 suffice.
  @functools.lru_cache(maxsize=2)
  def permutation(epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, 0, epoch]).permutation(n)

  warn = skipping.SkipWarnings(source)
  n = len(source)

  def example_at(j: int) -> dict[str, np.ndarray]:
    g = stream_position(j, b, global_batch_size, process_index)
    epoch, i = divmod(g, n)
    return skipping.first_readable(prepare, permutation(epoch), i, g, warn)

  return example_at


def train_iterator(
  source: Source,
  *,
  global_batch_size: int,
  image_size: int,
  seed: int,
  start_step: int = 0,
  normalization: str,
  rrc_scale: tuple[float, float] = (0.08, 1.0),
  rrc_ratio: tuple[float, float] = (3 / 4, 4 / 3),
  hflip: bool = True,
  randaugment: str = "",
  random_erase: float = 0.0,
  fixed_view: bool = False,
  crop_pct: float = 0.875,
  targets: target_store.TeacherTargets | None = None,
  jpeg_downscale: bool = True,
  process_index: int = 0,
  process_count: int = 1,
  num_threads: int = 2,
) -> Iterator[dict[str, np.ndarray]]:
  """Infinite, exactly resumable iterator of augmented training batches.

  Epoch e visits the source in a permutation derived from (seed, e); epochs
  are concatenated into one stream, global step s is its positions
  [s*B, (s+1)*B), and this process gets the slice [p*b, (p+1)*b) of that
  (b = B / process_count). An example's augmentation is derived from (seed,
  its stream position). So the output depends only on (seed, step): not on
  process_count, num_threads, or whether the run was resumed.

  An example that fails to decode or augment (any exception: a corrupt
  record) is replaced by the next example of the permutation that works,
  augmented with the same draws, and flagged in ``skipped``; the first few
  failures are printed with the example's index.

  Args:
    source: random-access source, see `sources.make_source`.
    global_batch_size: B, the batch size summed over processes.
    image_size: S, output height and width.
    seed: non-negative; fixes order and augmentation.
    start_step: the first global step to yield (the checkpointed step).
    normalization: a key of `transforms.NORMALIZATIONS`.
    rrc_scale: random-resized-crop area range, as a fraction of the image.
    rrc_ratio: random-resized-crop aspect ratio (w / h) range.
    hflip: whether to flip horizontally with probability 1/2.
    randaugment: a timm RandAugment string such as ``"rand-m9-mstd0.5-inc1"``
      (see `randaugment.parse_randaugment`), applied after crop and flip; ""
      for none. Geometric ops fill with the normalisation mean's colour.
    random_erase: probability of timm's random erasing (pixel mode, one
      rectangle) after normalisation; 0 for none.
    fixed_view: every example is the eval view (shorter side resized to
      round(S / crop_pct), centre S x S crop, as `eval_iterator`) instead of
      a random-resized crop and flip, which `rrc_*` and `hflip` then no
      longer ask for: the pixels `at_jax.experiment.precompute` ran the teacher on.
      RandAugment and random erasing must be off.
    crop_pct: the fixed view's crop fraction.
    targets: stored teacher targets; each example gets its ``teacher_<key>``
      arrays, read by its index in `source`. Needs `fixed_view`, and the
      view and example count (and fingerprint, `sources.fingerprint`) they were computed with.
    jpeg_downscale: whether JPEGs may decode at a reduced scale (`transforms.decode`).
    process_index: p, this process.
    process_count: number of processes sharing each global batch.
    num_threads: grain threads decoding and augmenting examples.

  Yields:
    ``{"image": float32 [b, S, S, 3], "label": int32 [b], "skipped": bool
    [b]}`` (``skipped``: the example stands in for an unreadable one), and
    with `targets` each ``teacher_<key>``: bfloat16 [b, layers, ...].
  """
  b = local_batch_size(global_batch_size, process_index, process_count, "data.batch_size")
  view = dict(
    image_size=image_size,
    crop_pct=crop_pct,
    normalization=normalization,
    jpeg_downscale=jpeg_downscale,
  )
  augment = dict(randaugment=randaugment, random_erase=random_erase)
  options.check_train_args(
    **view, **augment, seed=seed, rrc_scale=rrc_scale, rrc_ratio=rrc_ratio, fixed_view=fixed_view
  )
  n = len(source)
  if n == 0:
    raise ConfigError("data.train_split", "the training source is empty.")
  if targets is not None:
    options.check_targets(
      targets,
      fixed_view=fixed_view,
      num_examples=n,
      fingerprint=sources.fingerprint(source),
      **view,
    )
  crop = dict(scale=rrc_scale, ratio=rrc_ratio, hflip=hflip)
  preprocess = transforms.train_preprocessor(
    **view, **augment, **crop, seed=seed, fixed_view=fixed_view
  )

  def prepare(index: int, g: int) -> dict[str, np.ndarray]:
    out = preprocess(source[index], g)
    if targets is not None:
      out.update(targets[index])
    return out

  example_at = _shuffled_stream(prepare, source, seed, b, global_batch_size, process_index)
  ds = grain.MapDataset.range(start_step * b, sys.maxsize).map(example_at)
  return _batches(ds, b, num_threads, drop_remainder=True)


# ----------------------------------------------------------------------------
# Evaluation.


def _eval_stream(
  source: Source, *, b: int, global_batch_size: int, process_index: int, **view: Any
) -> Callable[[int], dict[str, np.ndarray]]:
  """This process's j-th example -> the source's example at its stream position in the eval view
  (`view`: image_size, crop_pct, normalization), or padding (mask False) past the end or unreadable."""
  preprocess = transforms.eval_preprocessor(**view)
  n = len(source)
  size = view["image_size"]
  padding = {
    "image": np.zeros((size, size, 3), np.float32),
    "label": np.int32(0),
    "mask": np.False_,
    "skipped": np.False_,
  }
  warn = skipping.SkipWarnings(source)

  def example_at(j: int) -> dict[str, np.ndarray]:
    g = stream_position(j, b, global_batch_size, process_index)
    if g >= n:
      return padding
    try:
      out = preprocess(source[g])
    except Exception as e:  # pylint: disable=broad-exception-caught
      # Decoders raise many types for a bad record.
      warn(g, e, "left out (mask False)")
      return {**padding, "skipped": np.True_}
    return {**out, "skipped": np.False_}

  return example_at


def eval_iterator(
  source: Source,
  *,
  global_batch_size: int,
  image_size: int,
  crop_pct: float = 0.875,
  normalization: str,
  process_index: int = 0,
  process_count: int = 1,
  num_threads: int = 2,
  start_batch: int = 0,
  jpeg_downscale: bool = True,
) -> Iterator[dict[str, np.ndarray]]:
  """One ordered pass over `source`, padded to whole global batches.

  Global batch s holds examples [s*B, (s+1)*B) (past the end: padding with
  mask False); this process gets the slice [p*b, (p+1)*b) (`eval_example_indices`). Summing over
  ``mask`` across processes counts every readable example exactly once; an
  example that fails to decode (a corrupt record) has mask False and
  ``skipped`` True, and the first few are printed with their index.

  Args:
    source: random-access source, see `sources.make_source`.
    global_batch_size: B, the batch size summed over processes (``data.eval_batch_size``).
    image_size: S, output height and width.
    crop_pct: the shorter side is resized to round(S / crop_pct) before the
      centre S x S crop.
    normalization: a key of `transforms.NORMALIZATIONS`.
    process_index: p, this process.
    process_count: number of processes sharing each global batch.
    num_threads: grain threads decoding and preprocessing examples.
    start_batch: the first global batch to yield (resuming a pass).
    jpeg_downscale: whether JPEGs may decode at a reduced scale (`transforms.decode`).

  Yields:
    ``{"image": float32 [b, S, S, 3], "label": int32 [b], "mask": bool [b],
    "skipped": bool [b]}`` for global batches start_batch ..
    ceil(len(source) / B) - 1.
  """
  b = local_batch_size(global_batch_size, process_index, process_count, "data.eval_batch_size")
  view = dict(
    image_size=image_size,
    crop_pct=crop_pct,
    normalization=normalization,
    jpeg_downscale=jpeg_downscale,
  )
  options.check_eval_args(**view)
  num_batches = -(-len(source) // global_batch_size)
  example_at = _eval_stream(
    source, b=b, global_batch_size=global_batch_size, process_index=process_index, **view
  )
  ds = grain.MapDataset.range(start_batch * b, num_batches * b).map(example_at)
  return _batches(ds, b, num_threads, drop_remainder=False)
