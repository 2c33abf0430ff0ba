"""The encoder: blocks (attention + MLP, pre-norm, drop path, LayerScale) stacked as a Python loop or
`nn.scan`, with optional remat; what every block shares travels as one hashable `BlockArch` (defined
in `attention`, the lower of the two modules, so that neither imports the other back).

Per-layer outputs are stacked [L, ...]: the attention logits every layer attended with, q/k/v when
asked, and the in-block distillation cross-entropy (`attention.AttnTarget`).
"""

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from at_jax.models import attention, inits
from at_jax.models.attention import BlockArch  # here for the blocks, vit and mae

Array = jax.Array


REMAT_POLICIES = {
  "none": None,
  "full": jax.checkpoint_policies.nothing_saveable,
  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def sample_drop_masks(rng: Array, batch: int, depth: int, rate: float) -> Array:
  """Per-sample stochastic-depth masks [L, R, B] (R = 2: attention branch, MLP branch), already scaled.

  Layer l keeps a sample with probability 1 - rate * l / (depth - 1) (timm's linspace); kept samples are
  scaled by 1 / keep_prob. The train step draws these once and hands the same masks to teacher and student.
  """
  keep_L = 1.0 - jnp.linspace(0.0, rate, depth, dtype=jnp.float32)
  keep = jax.random.bernoulli(rng, keep_L[:, None, None], (depth, 2, batch))
  return keep.astype(jnp.float32) / keep_L[:, None, None]


ACTIVATIONS = {
  # Exact GELU, as timm/MAE/the paper, in its erf form: jax.nn.gelu's exact form goes through erfc, which
  # XLA:CPU expands into two polynomial branches per element (12% of a Ti/16 step); same values to 1e-6.
  "gelu": lambda x: 0.5 * x * (1.0 + jax.lax.erf(x * 2**-0.5)),
  "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
  "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP
  # Gated (`GATED`): the first Dense is twice `mlp_dim` wide, [gate | value] halves, as DINOv2's fused
  # `weights_in`; silu(gate) * value is `mlp_dim` wide.
  "swiglu": lambda x: jax.nn.silu(x[..., : x.shape[-1] // 2]) * x[..., x.shape[-1] // 2 :],
}
# Activations that halve their input: their MLP's first Dense is 2 * mlp_dim wide.
GATED = frozenset({"swiglu"})


class MlpBlock(nn.Module):
  arch: BlockArch

  @nn.compact
  def __call__(self, x_BND: Array) -> Array:
    a = self.arch
    dense = lambda n, name: nn.Dense(
      n, dtype=a.dtype_mm, kernel_init=inits.dense_kernel(a.weight_init), name=name
    )
    hidden = a.mlp_dim * (2 if a.mlp_act in GATED else 1)
    y_BNF = ACTIVATIONS[a.mlp_act](dense(hidden, "Dense_0")(x_BND))
    return dense(x_BND.shape[-1], "Dense_1")(y_BNF)


class Block(nn.Module):
  """Pre-norm encoder block. Scan-compatible: `(x, (override, drop, target)) -> (x, out)`."""

  arch: BlockArch
  want_qkv: bool = False
  copied: bool = False
  loss: attention.LossForm = attention.LossForm()

  @nn.compact
  def __call__(
    self,
    x_BND: Array,
    inputs: tuple[attention.Override | None, Array | None, Mapping[str, Array] | None],
  ) -> tuple[Array, dict[str, Array]]:
    a = self.arch
    override, drop_RB, target = inputs
    width = x_BND.shape[-1]

    def residual(y_BND, i):
      y_BND = y_BND.astype(jnp.float32)
      if a.layerscale_init > 0:
        scale_D = self.param(
          f"layerscale_{i}", nn.initializers.constant(a.layerscale_init), (width,)
        )
        y_BND = y_BND * scale_D
      return y_BND if drop_RB is None else y_BND * drop_RB[i][:, None, None]

    y_BND = nn.LayerNorm(epsilon=a.norm_eps, name="LayerNorm_0")(x_BND)
    y_BND, out = attention.Attention(
      a, self.copied, self.loss, name="MultiHeadDotProductAttention_0"
    )(y_BND, override, self.want_qkv, target)
    x_BND = x_BND + residual(y_BND, 0)
    y_BND = nn.LayerNorm(epsilon=a.norm_eps, name="LayerNorm_1")(x_BND)
    x_BND = x_BND + residual(MlpBlock(a, name="MlpBlock_0")(y_BND), 1)
    # The block's output (the residual stream), for feature distillation; unused, jit drops it.
    return x_BND, {**out, "features": x_BND}


def _copied_layers(override: attention.Override | None, depth: int) -> np.ndarray:
  """[L] bool: the layers whose every head takes the teacher's logits, read from a concrete (numpy) mask.

  A traced mask says nothing at trace time; those layers then compute their own q and k as well.
  """
  if override is None or "logits" not in override or not isinstance(override["mask"], np.ndarray):
    return np.zeros((depth,), bool)
  return override["mask"].all(axis=1)


class Encoder(nn.Module):
  """The stack of blocks, as a Python loop or an `nn.scan`, optionally rematerialised."""

  depth: int
  arch: BlockArch
  scan: bool = False
  remat_policy: str = "none"
  want_qkv: bool = False

  @nn.compact
  def __call__(
    self,
    x_BND: Array,
    override: attention.Override | None,
    drop_LRB: Array | None,
    target: attention.AttnTarget | None = None,
  ) -> tuple[Array, dict[str, Array]]:
    block = Block
    if self.remat_policy != "none":
      block = nn.remat(Block, policy=REMAT_POLICIES[self.remat_policy], prevent_cse=not self.scan)
    form = attention.LossForm() if target is None else target.form
    copied_L = _copied_layers(override, self.depth)
    if self.scan:
      # Scanned blocks need every layer's inputs alike: unselected layers get zero targets (a uniform
      # teacher map) whose loss the reduction in `transfer` ignores.
      full = (
        None
        if target is None
        else {
          k: jnp.zeros((self.depth,) + v.shape[1:], v.dtype).at[jnp.asarray(target.layers)].set(v)
          for k, v in target.values.items()
        }
      )
      scanned = nn.scan(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=0,
        length=self.depth,
      )
      scanned_block = scanned(
        self.arch, self.want_qkv, bool(copied_L.all()), form, name="encoderblock"
      )
      return scanned_block(x_BND, (override, drop_LRB, full))
    outs = []
    for i in range(self.depth):
      layer = lambda tree: None if tree is None else jax.tree.map(lambda a: a[i], tree)
      target_i = None
      if target is not None and i in target.layers:
        target_i = {k: v[target.layers.index(i)] for k, v in target.values.items()}
      x_BND, out = block(
        self.arch, self.want_qkv, bool(copied_L[i]), form, name=f"encoderblock_{i}"
      )(x_BND, (layer(override), layer(drop_LRB), target_i))
      outs.append(out)
    if target is not None:  # layers without a target report zero loss, so that the outputs stack
      heads = self.arch.num_heads
      outs = [
        o if "attn_ce" in o else {**o, "attn_ce": jnp.zeros((heads,), jnp.float32)} for o in outs
      ]
    return x_BND, jax.tree.map(lambda *a: jnp.stack(a), *outs)
