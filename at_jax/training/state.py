"""What every task shares: the TrainState, its birth in its shardings, the optimizer + EMA update, the
raw-vs-EMA evaluation, and jit with explicit shardings.

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

Array = jax.Array
Batch = Mapping[str, Array]
# (params, ema_params, batch, teacher_params) -> sums over the batch's valid examples, with "count".
EvalStep = Callable[[Any, Any, Batch, Any], dict]


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
