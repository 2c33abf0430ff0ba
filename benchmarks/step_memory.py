"""Compiled memory of the whole train step as images grow: scratch vs distill with each loss (run by hand).

  python benchmarks/step_memory.py                                    # B/16, 224/448/640 px, CPU is fine
  python benchmarks/step_memory.py --variant=L/16 --batch=8 --remat=full,dots

Compiles (does not run) `train_step.make_train_step` for `transfer.mode` none and distill (all layers, from
the teacher's q and k, `transfer.loss_impl` direct / blockwise) and prints XLA's `memory_analysis()`:
temp bytes (activations and scratch), arguments (state, batch, teacher) and outputs. Memory analysis is
exact for the compiled program on the backend that compiled it, so the CPU's figures are meaningful; run
it on the accelerator for that backend's own fusion decisions.
"""

from absl import app, flags

flags.DEFINE_string("variant", "B/16", "Student and teacher ViT variant.")
flags.DEFINE_list("image_sizes", ["224", "448", "640"], "Image sizes.")
flags.DEFINE_integer("batch", 2, "Global batch.")
flags.DEFINE_list("remat", ["none", "full"], "Remat policies.")
flags.DEFINE_string("dtype", "float32", "dtype_mm.")
flags.DEFINE_bool("scan", False, "Scan over layers (model.scan).")
FLAGS = flags.FLAGS
MIB = 2.0**20
SETTINGS = [  # (row name, transfer.mode, transfer.loss_impl)
  ("scratch", "none", "direct"),
  ("distill, direct loss", "distill", "direct"),
  ("distill, blockwise loss", "distill", "blockwise"),
]


def main(argv):
  del argv
  import jax

  from at_jax import sharding

  mesh = sharding.make_mesh(-1, 1, jax.devices()[:1])
  print(
    f"{jax.devices()[0].device_kind}; jax {jax.__version__}; {FLAGS.variant}, batch {FLAGS.batch}, "
    f"{FLAGS.dtype} matmuls, scan={FLAGS.scan}\n"
  )
  print("| img | tokens | remat | step | temp MiB | args MiB | out MiB | one layer's maps MiB |")
  print("|---|---|---|---|---|---|---|---|")
  for size in map(int, FLAGS.image_sizes):
    for remat in FLAGS.remat:
      _print_rows(size, remat, mesh)


def _abstract_state(model, size: int):
  """(abstract params, schedule, optimizer, abstract train state) of `model` at `size` px: shapes only."""
  import jax
  import jax.numpy as jnp

  from at_jax import optim
  from at_jax.training import classify as train_step

  abstract = jax.eval_shape(
    lambda m=model, s=size: m.init(jax.random.key(0), jnp.zeros((1, s, s, 3)), train=False)[
      "params"
    ]
  )
  schedule = optim.make_schedule(
    base_lr=1e-4, batch_size=FLAGS.batch, warmup_steps=1, total_steps=10, min_lr=0.0
  )
  tx = optim.make_optimizer(abstract, schedule=schedule, depth=model.depth, **optim.MAE_ADAMW)
  state = jax.eval_shape(
    lambda r, m=model, s=size: train_step.init_state(m, tx, r, s), jax.random.key(0)
  )
  return abstract, schedule, tx, state


def _print_rows(size: int, remat: str, mesh) -> None:
  """One table row per step setting (scratch, distill with each loss) at `size` px and `remat`."""
  import jax
  import jax.numpy as jnp

  from at_jax import sharding
  from at_jax.models import vit
  from at_jax.training import classify as train_step
  from at_jax.training import state as train_state
  from at_jax.transfer import spec

  model = vit.build(
    {
      "variant": FLAGS.variant,
      "num_classes": 1000,
      "dtype_mm": FLAGS.dtype,
      "remat_policy": remat,
      "scan": FLAGS.scan,
    }
  )
  images = jax.ShapeDtypeStruct((FLAGS.batch, size, size, 3), jnp.float32)
  labels = jax.ShapeDtypeStruct((FLAGS.batch,), jnp.int32)
  abstract, schedule, tx, state = _abstract_state(model, size)
  shardings = sharding.tree_shardings(mesh, state)
  tokens = model.tokens_for(size)
  for name, mode, impl in SETTINGS:
    t = spec.resolve({"mode": mode, "loss_impl": impl}, model, model, size)
    step = train_step.make_train_step(
      model, model, tx, t, schedule=schedule, label_smoothing=0.1, ema_decay=0.9999
    )
    train, _ = train_state.jit_steps(
      step,
      train_step.make_eval_step(model, model, t),
      mesh,
      shardings,
      sharding.tree_shardings(mesh, abstract),
    )
    mem = (
      train.lower(state, {"image": images, "label": labels}, abstract).compile().memory_analysis()
    )
    layer_maps = FLAGS.batch * model.num_heads * tokens**2 * 4
    print(
      f"| {size} | {tokens} | {remat} | {name} | {mem.temp_size_in_bytes / MIB:.0f} | "
      f"{mem.argument_size_in_bytes / MIB:.0f} | {mem.output_size_in_bytes / MIB:.0f} | "
      f"{layer_maps / MIB:.0f} |",
      flush=True,
    )


if __name__ == "__main__":
  app.run(main)
