"""What every task shares: the TrainState, its birth in its shardings, gradient accumulation over
micro-batches, the optimizer + EMA update, the raw-vs-EMA evaluation, and jit with explicit shardings.

Teacher params are an *argument* of the steps: never closed over, never donated, never in the state.
"""

from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from at_jax import sharding
from at_jax.errors import ConfigError

Array = jax.Array
Batch = Mapping[str, Array]
# (params, ema_params, batch, teacher_params) -> sums over the batch's valid examples, with "count".
EvalStep = Callable[[Any, Any, Batch, Any], dict]
# (params, batch, rng) -> (grads, scalar metrics) of one (micro-)batch; the metrics are batch means.
GradFn = Callable[[Any, Batch, Array], tuple[Any, dict]]


@flax.struct.dataclass
class TrainState:
  step: Array
  params: Any
  opt_state: Any
  ema_params: Any
  rng: Array


def new_state(params: Any, tx: optax.GradientTransformation, rng: Array) -> TrainState:
  """Step 0 of training `params`: fresh optimizer state, EMA = params."""
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=tx.init(params),
    ema_params=params,
    rng=rng,
  )


def init_state(
  init_params: Callable[[Array], Any], tx: optax.GradientTransformation, rng: Array
) -> TrainState:
  """A fresh state: params from `init_params(key)`, and the key the steps fold the step into.

  Meant to run under `jax.jit(..., out_shardings=...)` (`create_sharded_state`), so it is born sharded.
  """
  rng_init, rng_train = jax.random.split(rng)
  return new_state(init_params(rng_init), tx, rng_train)


def create_sharded_state(
  init_fn: Callable[[Array], TrainState], rng: Array, mesh: Mesh
) -> tuple[TrainState, Any]:
  """Returns (init_fn(rng), its shardings); the state is created directly in its shardings."""
  shardings = sharding.tree_shardings(mesh, jax.eval_shape(init_fn, rng))
  return jax.jit(init_fn, out_shardings=shardings)(rng), shardings


def check_accum_steps(accum_steps: int, batch_size: int, devices: int, unit: int = 1) -> None:
  """Raises ConfigError("optim.accum_steps") unless `batch_size` splits into `accum_steps` micro-batches
  of whole `unit`s (mix groups), each of which splits evenly over the mesh's `devices`."""
  if isinstance(accum_steps, bool) or not isinstance(accum_steps, int) or accum_steps < 1:
    raise ConfigError(
      "optim.accum_steps", f"must be an integer >= 1 (1: none), got {accum_steps!r}"
    )
  if batch_size % (accum_steps * unit):
    whole = f" of whole groups of data.mix_group_size={unit}" if unit > 1 else ""
    raise ConfigError(
      "optim.accum_steps",
      f"data.batch_size={batch_size} does not split into {accum_steps} equal micro-batches{whole}",
    )
  if (batch_size // accum_steps) % devices:
    raise ConfigError(
      "optim.accum_steps",
      f"the micro-batch of {batch_size} / {accum_steps} = {batch_size // accum_steps} examples is not "
      f"divisible by the {devices} devices of the mesh",
    )


def micro_batches(batch: Batch, accum_steps: int, unit: int = 1) -> dict[str, Array]:
  """Every leaf [B, ...] -> [accum_steps, B / accum_steps, ...]: micro-batch m holds the units (runs of
  `unit` consecutive examples: mix groups) m, m + k, m + 2k, ... of the batch, in order.

  Interleaved, not contiguous: a batch sharded in contiguous blocks over the devices then gives every
  micro-batch an equal share on each device (no resharding), and which examples form a micro-batch
  depends on the batch's order alone, not on the mesh.
  """

  def split(x: Array) -> Array:
    b = x.shape[0]
    x = x.reshape(b // (accum_steps * unit), accum_steps, unit, *x.shape[1:])
    return jnp.swapaxes(x, 0, 1).reshape(accum_steps, b // accum_steps, *x.shape[3:])

  return {k: split(v) for k, v in batch.items()}


def accumulate_gradients(
  grad_fn: GradFn, params: Any, batch: Batch, rng: Array, accum_steps: int, unit: int = 1
) -> tuple[Any, dict]:
  """The mean grads and metrics of `grad_fn` over `accum_steps` micro-batches (`micro_batches`).

  Micro-batch m gets the key fold_in(rng, m): its own drop-path masks, mixing and MAE masks. A
  `jax.lax.scan` runs them one after the other, so memory holds one micro-batch's activations and the
  compiled program does not grow with `accum_steps`. With equal micro-batches, the mean of their mean
  losses is the batch's mean loss, so the grads equal the whole batch's where nothing random differs.
  `accum_steps` 1 is `grad_fn(params, batch, rng)` itself (the same key: runs without accumulation
  draw as before).
  """
  if accum_steps == 1:  # mix_groups checks the groups against the batch itself
    return grad_fn(params, batch, rng)
  check_accum_steps(accum_steps, next(iter(batch.values())).shape[0], 1, unit)
  micro = micro_batches(batch, accum_steps, unit)

  def one(m: Array, x: Batch) -> tuple[Any, dict]:
    x = jax.tree.map(sharding.constrain_batch, x)  # each micro-batch stays split over every device
    return grad_fn(params, x, jax.random.fold_in(rng, m))

  first = jax.tree.map(lambda v: v[0], micro)
  _, metric_shapes = jax.eval_shape(one, 0, first)  # traced abstractly: compiles nothing
  # zeros_like(params): the grads' running sum takes the params' (fsdp) layout, not a replicated one.
  zeros = (
    jax.tree.map(jnp.zeros_like, params),
    jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), metric_shapes),
  )

  def body(total: tuple, xs: tuple) -> tuple[tuple, None]:
    return jax.tree.map(jnp.add, total, one(*xs)), None

  total, _ = jax.lax.scan(body, zeros, (jnp.arange(accum_steps), micro))
  return jax.tree.map(lambda t: t / accum_steps, total)


def apply_gradients(
  state: TrainState, grads: Any, tx: optax.GradientTransformation, ema_decay: float
) -> TrainState:
  """One optimizer step on `grads`, the EMA of the new params, and step + 1."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, state.ema_params, params)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema)


def raw_and_ema(sums_fn: Callable[[Any], dict], params: Any, ema_params: Any) -> dict:
  """`sums_fn` of the raw params, and of the EMA params with its keys prefixed "ema_"."""
  sums = dict(sums_fn(params))
  sums.update({f"ema_{k}": v for k, v in sums_fn(ema_params).items()})
  return sums


def jit_steps(
  train_step: Callable,
  eval_step: EvalStep,
  mesh: Mesh,
  state_shardings: Any,
  teacher_shardings: Any,
) -> tuple[Callable, Callable]:
  """`jax.jit` with explicit shardings; the state is donated, the teacher is not."""
  batch = sharding.batch_sharding(mesh)
  rep = sharding.replicated(mesh)
  train = jax.jit(
    sharding.on_mesh(train_step, mesh),
    in_shardings=(state_shardings, batch, teacher_shardings),
    out_shardings=(state_shardings, rep),
    donate_argnums=(0,),
  )
  evaluate = jax.jit(
    sharding.on_mesh(eval_step, mesh),
    in_shardings=(state_shardings.params, state_shardings.ema_params, batch, teacher_shardings),
    out_shardings=rep,
  )
  return train, evaluate
