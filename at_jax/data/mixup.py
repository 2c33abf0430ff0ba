"""timm's Mixup / CutMix (mode "batch") of the global batch, in JAX, inside the jitted train step.

Run on the global batch so that teacher and student see the same mixed images whatever the number of
hosts. All randomness comes from the caller's JAX key. Imports only jax and at_jax.errors: training
imports it. `check_mix_args` is the range check of the ``data.mixup*`` / ``data.cutmix`` fields and
`check_group_size` that of ``data.mix_group_size``, for a start-up validation to call before anything is
compiled; `mix_batch` and `mix_groups` call them too.

`mix_batch` is one draw for a whole batch; `mix_groups` one draw per group of consecutive examples, as
the reference, whose every process runs timm's Mixup on its own 32 images: a global batch of 2048 gets
64 independent lambdas, boxes and mixup-vs-cutmix switches, each pairing within its 32 images. The groups
are fixed by the batch's order, not by the mesh or the hosts, so every layout mixes alike.
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


def check_group_size(
  group_size: int, batch_size: int, what: str = "the global batch", *, mixes: bool = True
) -> None:
  """Raises ConfigError("data.mix_group_size") unless it is 0 or an even integer dividing `batch_size`,
  and ConfigError("data.batch_size") for an odd batch drawn as one group (0) when the step `mixes`.

  Odd groups are refused: an example paired with itself stays unmixed (at 1, every example: mixing
  would be off silently). `what` names the batch in the message (with gradient accumulation: the
  micro-batch).
  """
  if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 0:
    raise ConfigError(
      "data.mix_group_size", f"must be an integer >= 0 (0: one draw per batch), got {group_size!r}"
    )
  if group_size % 2:
    raise ConfigError(
      "data.mix_group_size",
      f"{group_size} is odd: a group pairs example i with its mirror, so its middle example would "
      "be paired with itself and never mixed (timm asks for an even batch); use 0 or an even size",
    )
  if group_size and batch_size % group_size:
    raise ConfigError(
      "data.mix_group_size",
      f"{group_size} does not divide {what} of {batch_size} examples into whole groups",
    )
  if mixes and not group_size and batch_size % 2:
    raise ConfigError(
      "data.batch_size",
      f"{what} of {batch_size} examples is odd: mixup/CutMix pair example i with its mirror, "
      "so the middle one would be paired with itself and never mixed; use an even batch",
    )


def mix_groups(
  rng: jax.Array,
  images: jax.Array,
  labels: jax.Array,
  num_classes: int,
  *,
  group_size: int = 0,
  **mix: float,
) -> tuple[jax.Array, jax.Array]:
  """`mix_batch` on each group of `group_size` consecutive examples, each with its own draw.

  Group j (examples j*g .. j*g+g-1) is mixed exactly as `mix_batch(fold_in(rng, j), group, ...)` would
  mix it alone: its own lambda, box and mixup-vs-cutmix switch, example i of the group paired with
  g-1-i (timm's flip within a process batch). `group_size` 0 is one draw for the whole batch
  (`mix_batch(rng, ...)`, the key unchanged).

  Args:
    rng: JAX key of the batch.
    images: float [B, H, W, C].
    labels: int [B].
    num_classes: C.
    group_size: g, 0 or a divisor of B (>= 2).
    **mix: the other keyword arguments of `mix_batch` (alphas, probabilities, label_smoothing).

  Returns:
    (images [B, H, W, C] of the input dtype, soft labels float32 [B, C]).

  Raises:
    ConfigError: a bad `group_size` (data.mix_group_size) or mixing argument.
  """
  batch = images.shape[0]
  check_group_size(group_size, batch)
  if group_size == 0:
    return mix_batch(rng, images, labels, num_classes, **mix)
  groups = batch // group_size
  keys = jax.vmap(lambda j: jax.random.fold_in(rng, j))(jnp.arange(groups))
  mixed, soft = jax.vmap(lambda key, x, y: mix_batch(key, x, y, num_classes, **mix))(
    keys,
    images.reshape(groups, group_size, *images.shape[1:]),
    labels.reshape(groups, group_size),
  )
  return mixed.reshape(images.shape), soft.reshape(batch, num_classes)
