"""A training head: one linear map per layer, so that a student's features or q/k/v reach a teacher of
another width (`ViT.feature_dim`); exports drop it (`vit.export_view`)."""

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
PROJECTED = ("features", "q", "k", "v")  # what `ViT.projected` may name


class FeatureProjection(nn.Module):
  """One linear map per layer, [L, B, N, D] -> [L, B, N, features]: kernel [L, D, F], bias [L, F]."""

  features: int
  dtype_mm: str = "float32"

  @nn.compact
  def __call__(self, x_LBND: Array) -> Array:
    depth, width = x_LBND.shape[0], x_LBND.shape[-1]
    kernel_init = nn.initializers.xavier_uniform(in_axis=-2, out_axis=-1, batch_axis=(0,))
    kernel_LDF = self.param("kernel", kernel_init, (depth, width, self.features))
    bias_LF = self.param("bias", nn.initializers.zeros, (depth, self.features))
    mm = jnp.dtype(self.dtype_mm)
    y_LBNF = jnp.einsum("lbnd,ldf->lbnf", x_LBND.astype(mm), kernel_LDF.astype(mm))
    return y_LBNF.astype(jnp.float32) + bias_LF[:, None, None, :]
