"""timm's Mixup / CutMix (mode "batch") of the global batch, in JAX, inside the jitted train step.

Run on the global batch so that teacher and student see the same mixed images whatever the number of
hosts. All randomness comes from the caller's JAX key. Imports only jax and at_jax.errors: training
imports it. `check_mix_args` is the range check of the ``data.mixup*`` / ``data.cutmix`` fields, for a
start-up validation to call before anything is compiled; `mix_batch` calls it too.
"""

import jax
import jax.numpy as jnp

from at_jax.errors import ConfigError


def mixup_target(
  labels: jax.Array, num_classes: int, lam: jax.Array | float, label_smoothing: float
) -> jax.Array:
  """timm's `mixup_target`: smoothed one-hots mixed with the flipped batch's.

  Args:
    labels: int [B].
    num_classes: C.
    lam: scalar weight of each example's own label.
    label_smoothing: s; the true class gets 1 - s + s / C, others s / C.

  Returns:
    float32 [B, C], rows summing to 1.
  """
  off = label_smoothing / num_classes
  y = jax.nn.one_hot(labels, num_classes) * (1 - label_smoothing) + off
  return lam * y + (1 - lam) * y[::-1]


def cutmix_box(
  lam: jax.Array, center_y: jax.Array, center_x: jax.Array, height: int, width: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
  """timm's `rand_bbox` + `cutmix_bbox_and_lam` for a given centre.

  The box has sides floor(size * sqrt(1 - lam)) around the centre, clipped to
  the image; lam is then corrected to 1 - (clipped box area) / (image area).

  Returns:
    (top, bottom, left, right) int32 scalars (bottom and right exclusive),
    and the corrected lam.
  """
  ratio = jnp.sqrt(1 - lam)
  cut_h = jnp.floor(height * ratio).astype(jnp.int32)
  cut_w = jnp.floor(width * ratio).astype(jnp.int32)
  top = jnp.clip(center_y - cut_h // 2, 0, height)
  bottom = jnp.clip(center_y + (cut_h + 1) // 2, 0, height)
  left = jnp.clip(center_x - cut_w // 2, 0, width)
  right = jnp.clip(center_x + (cut_w + 1) // 2, 0, width)
  area = (bottom - top) * (right - left)
  return top, bottom, left, right, 1 - area / (height * width)


def check_mix_args(
  *,
  num_classes: int,
  mixup_alpha: float,
  cutmix_alpha: float,
  switch_prob: float = 0.5,
  prob: float = 1.0,
  label_smoothing: float = 0.0,
) -> None:
  """Raises ConfigError naming the config field of the first argument of `mix_batch` out of range.

  Checks ``data.mixup`` and ``data.cutmix`` >= 0 (0: off), ``data.mixup_switch_prob`` and
  ``data.mixup_prob`` in [0, 1], ``optim.label_smoothing`` in [0, 1), ``model.num_classes`` >= 1,
  whether or not mixing is on.
  """
  for field, value in (("data.mixup", mixup_alpha), ("data.cutmix", cutmix_alpha)):
    if value < 0:
      raise ConfigError(field, f"alpha must be >= 0 (0: off), got {value}.")
  for field, value in (("data.mixup_switch_prob", switch_prob), ("data.mixup_prob", prob)):
    if not 0 <= value <= 1:
      raise ConfigError(field, f"must be in [0, 1], got {value}.")
  if not 0 <= label_smoothing < 1:
    raise ConfigError("optim.label_smoothing", f"must be in [0, 1), got {label_smoothing}.")
  if num_classes < 1:
    raise ConfigError("model.num_classes", f"must be positive, got {num_classes}.")


def mix_batch(
  rng: jax.Array,
  images: jax.Array,
  labels: jax.Array,
  num_classes: int,
  *,
  mixup_alpha: float,
  cutmix_alpha: float,
  switch_prob: float = 0.5,
  prob: float = 1.0,
  label_smoothing: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
  """timm's Mixup(mode="batch"): one Mixup or CutMix draw for the batch.

  Example i is mixed with example B-1-i (the flipped batch). With
  probability `prob` a lam is drawn: from Beta(cutmix_alpha, cutmix_alpha)
  for CutMix (chosen with probability `switch_prob` when both alphas are
  positive), else Beta(mixup_alpha, mixup_alpha). Mixup blends whole images
  with weight lam; CutMix pastes the partner's box (see `cutmix_box`) and
  uses the pasted fraction for the labels. Jit-compatible: the scalars are
  Python, and the box is a mask.

  Args:
    rng: JAX key; the only source of randomness.
    images: float [B, H, W, C]: the global batch, so that the result does not
      depend on how it is split over hosts.
    labels: int [B].
    num_classes: C.
    mixup_alpha: 0 turns Mixup off.
    cutmix_alpha: 0 turns CutMix off.
    switch_prob: probability of CutMix when both are on.
    prob: probability of mixing at all.
    label_smoothing: folded into the soft targets (timm's `mixup_target`), so
      the loss must not smooth them again.

  Returns:
    (images [B, H, W, C] of the input dtype, soft labels float32 [B, C]).
    Both alphas 0: the images unchanged and smoothed one-hot labels.

  Raises:
    ConfigError: an argument out of range (named by its config field).
  """
  check_mix_args(
    num_classes=num_classes,
    mixup_alpha=mixup_alpha,
    cutmix_alpha=cutmix_alpha,
    switch_prob=switch_prob,
    prob=prob,
    label_smoothing=label_smoothing,
  )
  if mixup_alpha == 0 and cutmix_alpha == 0:
    return images, mixup_target(labels, num_classes, 1.0, label_smoothing)
  keys = jax.random.split(rng, 6)
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(keys[0]) < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
  # Only the enabled Beta is drawn: Beta(0, 0) is undefined.
  lam_mixup = (
    jax.random.beta(keys[1], mixup_alpha, mixup_alpha) if mixup_alpha > 0 else jnp.float32(1)
  )
  lam_cutmix = (
    jax.random.beta(keys[2], cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0 else jnp.float32(1)
  )
  lam = jnp.where(use_cutmix, lam_cutmix, lam_mixup)
  lam = jnp.where(jax.random.uniform(keys[3]) < prob, lam, 1.0)

  _, height, width, _ = images.shape
  top, bottom, left, right, lam_box = cutmix_box(
    lam,
    jax.random.randint(keys[4], (), 0, height),
    jax.random.randint(keys[5], (), 0, width),
    height,
    width,
  )
  rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
  in_box = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
  # Per-pixel weight [H, W] of each image's own pixels. With weights 0 and 1
  # the blend below copies pixels exactly, so one formula serves both.
  own = jnp.where(use_cutmix, jnp.where(in_box, 0.0, 1.0), lam)
  own = own[None, :, :, None]
  x = images.astype(jnp.float32)
  mixed = (x * own + x[::-1] * (1 - own)).astype(images.dtype)
  lam = jnp.where(use_cutmix, lam_box, lam)
  return mixed, mixup_target(labels, num_classes, lam, label_smoothing)
