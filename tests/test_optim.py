"""Tests for at_jax.optim: lr schedule, weight-decay mask, layer decay, AdamW chain."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from at_jax import optim
from at_jax.errors import ConfigError
from at_jax.models import mae, vit
from at_jax.training import mae as mae_steps

DEPTH = 2  # Pico/4.
IMAGE = 8  # 2x2 patches of 4 px, plus cls: 5 tokens.

# Every kernel of a Pico/4 block, relative to the block.
BLOCK_KERNELS = (
  "MultiHeadDotProductAttention_0/query/kernel",
  "MultiHeadDotProductAttention_0/key/kernel",
  "MultiHeadDotProductAttention_0/value/kernel",
  "MultiHeadDotProductAttention_0/out/kernel",
  "MlpBlock_0/Dense_0/kernel",
  "MlpBlock_0/Dense_1/kernel",
)


def _paths(tree):
  """{'a/b/c': leaf} for a nested dict pytree."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(str(k.key) for k in path): leaf for path, leaf in flat}


def _constant(lr):
  return lambda count: lr


@pytest.fixture(scope="module")
def loop_params():
  """Pico/4's params: the model's own tree and shapes, filled with random values.

  (eval_shape + numpy, since compiling the init would take a good part of the time budget.)
  """
  model = vit.build({"variant": "Pico/4", "num_classes": 10})
  images = jnp.zeros((1, IMAGE, IMAGE, 3))
  shapes = jax.eval_shape(lambda k: model.init(k, images, train=False)["params"], jax.random.key(0))
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)


@pytest.fixture(scope="module")
def scan_shapes():
  """The params of a scan model as it initialises itself (structure and shapes)."""
  model = vit.build({"variant": "Pico/4", "num_classes": 10, "scan": True})
  images = jnp.zeros((1, IMAGE, IMAGE, 3))
  return jax.eval_shape(lambda k: model.init(k, images, train=False)["params"], jax.random.key(0))


def _grads(params, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), params)


# ---------------------------------------------------------------- make_schedule


def test_schedule_warmup_peak_and_cosine():
  peak = 1e-3 * 512 / 256
  s = optim.make_schedule(
    base_lr=1e-3, batch_size=512, warmup_steps=10, total_steps=110, min_lr=1e-5
  )
  assert float(s(0)) == 0.0
  for step in range(11):  # Linear from 0 to the peak over the warmup.
    assert float(s(step)) == pytest.approx(peak * step / 10, rel=1e-5, abs=1e-12)
  assert float(s(10)) == pytest.approx(peak, rel=1e-6)
  assert max(float(s(i)) for i in range(111)) == pytest.approx(peak, rel=1e-6)
  # Half cosine from the peak down to min_lr over the remaining 100 steps.
  assert float(s(60)) == pytest.approx(1e-5 + (peak - 1e-5) / 2, rel=1e-5)
  assert float(s(35)) == pytest.approx(
    1e-5 + (peak - 1e-5) * (1 + math.cos(math.pi / 4)) / 2, rel=1e-5
  )
  assert float(s(110)) == pytest.approx(1e-5, rel=1e-5)
  assert float(s(500)) == pytest.approx(1e-5, rel=1e-5)  # Stays at min_lr.
  values = [float(s(i)) for i in range(10, 111)]
  assert all(a >= b for a, b in zip(values, values[1:]))


def test_schedule_without_warmup_starts_at_peak():
  s = optim.make_schedule(base_lr=4e-4, batch_size=128, warmup_steps=0, total_steps=100, min_lr=0.0)
  assert float(s(0)) == pytest.approx(2e-4, rel=1e-6)
  assert float(s(50)) == pytest.approx(1e-4, rel=1e-5)
  assert float(s(100)) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(
  "warmup, total, field",
  [
    (10, 10, "schedule.warmup_epochs"),
    (11, 10, "schedule.warmup_epochs"),
    (-1, 10, "schedule.warmup_epochs"),
    (0, 0, "schedule.epochs"),
    (5, -3, "schedule.epochs"),
  ],
)
def test_schedule_rejects_bad_lengths(warmup, total, field):
  with pytest.raises(ConfigError) as e:
    optim.make_schedule(
      base_lr=1e-3, batch_size=256, warmup_steps=warmup, total_steps=total, min_lr=0.0
    )
  assert e.value.field == field


# ------------------------------------------------------------ weight_decay_mask


def test_weight_decay_mask_loop_layout(loop_params):
  mask = _paths(optim.weight_decay_mask(loop_params))
  assert set(mask) == set(_paths(loop_params))
  kernels = {"embedding/kernel", "head/kernel"} | {
    f"Transformer/encoderblock_{i}/{k}" for i in range(DEPTH) for k in BLOCK_KERNELS
  }
  assert {p for p, decayed in mask.items() if decayed} == kernels
  for p in (
    "cls",
    "pos_embedding",
    "embedding/bias",
    "head/bias",
    "fc_norm/scale",
    "Transformer/encoderblock_0/LayerNorm_0/scale",
    "Transformer/encoderblock_1/MultiHeadDotProductAttention_0/query/bias",
  ):
    assert mask[p] is False, p


def test_weight_decay_mask_scan_layout(loop_params, scan_shapes):
  scan_params = vit.loop_to_scan(loop_params)
  assert jax.tree.structure(scan_params) == jax.tree.structure(scan_shapes)
  kernels = {"embedding/kernel", "head/kernel"} | {
    f"Transformer/encoderblock/{k}" for k in BLOCK_KERNELS
  }
  for tree in (scan_params, scan_shapes):  # Concrete arrays and eval_shape alike.
    mask = _paths(optim.weight_decay_mask(tree))
    assert {p for p, decayed in mask.items() if decayed} == kernels
  # Stacked biases and norm scales are matrices [L, D] here, and still not decayed.
  shapes = _paths(scan_shapes)
  for p in (
    "Transformer/encoderblock/MlpBlock_0/Dense_0/bias",
    "Transformer/encoderblock/LayerNorm_1/scale",
    "Transformer/encoderblock/MultiHeadDotProductAttention_0/out/bias",
  ):
    assert len(shapes[p].shape) == 2
    assert not mask[p]


# ------------------------------------------------- weight_decay_mask, MAE's rule

MAE_ENCODER = {"variant": "Pico/7", "num_classes": 0, "pool": "cls", "posemb": "sincos2d"}


def _mae_shapes(scan=False, **encoder):
  """The params (structure and shapes) of a real MAE of Pico/7 on 28 px images."""
  module = mae.MAE(
    encoder={**MAE_ENCODER, "scan": scan, **encoder},
    decoder_width=32,
    decoder_depth=1,
    decoder_heads=2,
    decoder_mlp_dim=64,
  )
  return jax.eval_shape(mae_steps.params_initializer(module, 28), jax.random.key(0))


@pytest.mark.parametrize("scan", [False, True])
def test_mae_rule_decays_the_tokens_not_vectors_or_the_fixed_table(scan):
  mask = _paths(optim.weight_decay_mask(_mae_shapes(scan), "mae", frozen_posemb=True))
  decayed = {p for p, d in mask.items() if d}
  # MAE's add_weight_decay: every kernel, and the [1, 1, D] cls and mask tokens.
  assert decayed == {p for p in mask if p.endswith("/kernel")} | {"encoder/cls", "mask_token"}
  assert not mask["encoder/pos_embedding"]
  assert all(
    p.endswith(("/bias", "/scale")) for p in set(mask) - decayed - {"encoder/pos_embedding"}
  )
  # timm's rule on the same tree: kernels only.
  timm = _paths(optim.weight_decay_mask(_mae_shapes(scan), "timm", frozen_posemb=True))
  assert {p for p, d in timm.items() if d} == {p for p in mask if p.endswith("/kernel")}


def test_mae_rule_decays_a_learned_table_and_registers_not_layerscale():
  """As add_weight_decay would: a trainable [1, N, D] table and [1, R, D] registers are matrices;
  LayerScale's [D] is a vector."""
  shapes = _mae_shapes(posemb="learned", num_registers=2, layerscale_init=1e-4)
  mask = _paths(optim.weight_decay_mask(shapes, "mae", frozen_posemb=False))
  assert mask["encoder/pos_embedding"] and mask["encoder/registers"] and mask["encoder/cls"]
  assert not mask["encoder/Transformer/encoderblock_0/layerscale_0"]


def test_mae_rule_matches_timms_param_groups_on_maes_torch_model():
  """timm's param_groups_weight_decay (MAE's optim_factory.add_weight_decay) on MAE's own PyTorch model:
  the same number of decayed and of undecayed values as our mask on our MAE.

  Ours holds two things MAE's optimizer never sees: the frozen encoder table (MAE: requires_grad=False)
  and the ViT's own unused `encoder/encoder_norm` (MAE's norm is our top-level `encoder_norm`).
  """
  torch = pytest.importorskip("torch")
  from timm.optim import param_groups_weight_decay  # pylint: disable=import-outside-toplevel

  from tests.models import torch_mae  # pylint: disable=import-outside-toplevel

  torch.manual_seed(0)
  reference = torch_mae.MaskedAutoencoderViT(28, 7, 32, 2, 2, 2.0, 32, 1, 2)
  groups = param_groups_weight_decay(reference, 0.05)
  count = {g["weight_decay"] > 0: sum(p.numel() for p in g["params"]) for g in groups}
  shapes = _mae_shapes()
  mask = _paths(optim.weight_decay_mask(shapes, "mae", frozen_posemb=True))
  sizes = {p: int(np.prod(s.shape)) for p, s in _paths(shapes).items()}
  ours = {True: 0, False: 0}
  for p, decays in mask.items():
    if p != "encoder/pos_embedding" and not p.startswith("encoder/encoder_norm/"):
      ours[decays] += sizes[p]
  assert ours == count


def test_a_step_decays_the_tokens_and_leaves_the_fixed_table():
  """Zero gradients: one AdamW step scales exactly the decayed leaves by 1 - lr * wd."""
  shapes = _mae_shapes()
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32) + 1, shapes)
  tx = optim.make_optimizer(
    shapes,
    schedule=_constant(0.1),
    b1=0.9,
    b2=0.95,
    eps=1e-8,
    weight_decay=0.5,
    layer_decay=1.0,
    depth=2,
    decay_rule="mae",
    frozen_posemb=True,
  )
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  new = _paths(optax.apply_updates(params, updates))
  mask = _paths(optim.weight_decay_mask(shapes, "mae", frozen_posemb=True))
  for p, old in _paths(params).items():
    want = old * (1 - 0.05) if mask[p] else old
    np.testing.assert_allclose(new[p], want, rtol=1e-6, err_msg=p)
  np.testing.assert_array_equal(
    new["encoder/pos_embedding"], _paths(params)["encoder/pos_embedding"]
  )
  assert mask["mask_token"] and mask["encoder/cls"]


def test_unknown_decay_rule_is_a_config_error(loop_params):
  with pytest.raises(ConfigError) as e:
    optim.weight_decay_mask(loop_params, "adamw")
  assert e.value.field == "optim.decay_rule"
  with pytest.raises(ConfigError) as e:
    optim.make_optimizer(
      loop_params,
      schedule=_constant(0.1),
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      weight_decay=0.05,
      layer_decay=1.0,
      depth=DEPTH,
      decay_rule="none",
    )
  assert e.value.field == "optim.decay_rule"


# ----------------------------------------------------------- layer_decay_scales


def test_layer_decay_scales_loop_layout(loop_params):
  d = 0.5
  scales = _paths(optim.layer_decay_scales(loop_params, DEPTH, d))
  for p, s in scales.items():
    if p.split("/")[0] in ("embedding", "pos_embedding", "cls"):
      want = d ** (DEPTH + 1)
    elif p.startswith("Transformer/encoderblock_"):
      want = d ** (DEPTH - int(p.split("/")[1].split("_")[1]))
    else:
      assert p.split("/")[0] in ("fc_norm", "head")
      want = 1.0
    assert np.all(np.asarray(s) == pytest.approx(want)), p
  assert float(scales["cls"]) == pytest.approx(0.125)
  assert float(scales["embedding/kernel"]) == pytest.approx(0.125)
  assert float(scales["Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel"]) == pytest.approx(
    0.25
  )
  assert float(scales["Transformer/encoderblock_1/LayerNorm_0/scale"]) == pytest.approx(0.5)
  assert float(scales["head/kernel"]) == 1.0
  assert float(scales["fc_norm/bias"]) == 1.0


def test_layer_decay_scales_scan_layout(loop_params, scan_shapes):
  d = 0.75
  loop = _paths(optim.layer_decay_scales(loop_params, DEPTH, d))
  scan = _paths(optim.layer_decay_scales(scan_shapes, DEPTH, d))
  shapes = _paths(scan_shapes)
  for p, s in scan.items():
    leaf_shape = shapes[p].shape
    # Broadcastable to the leaf without growing it.
    assert np.broadcast_shapes(np.shape(s), leaf_shape) == leaf_shape, p
    full = np.broadcast_to(np.asarray(s, np.float32), leaf_shape)
    if p.startswith("Transformer/encoderblock/"):
      rest = p[len("Transformer/encoderblock/") :]
      for i in range(DEPTH):
        np.testing.assert_allclose(full[i], d ** (DEPTH - i), rtol=1e-6)
        np.testing.assert_allclose(full[i], loop[f"Transformer/encoderblock_{i}/{rest}"], rtol=1e-6)
    else:
      np.testing.assert_allclose(full, loop[p], rtol=1e-6)


def test_layer_decay_scales_match_timms_param_groups_with_registers_and_pre_norm():
  """timm's param_groups_layer_decay on its ViT with register tokens and norm_pre (DINOv2-reg, CLIP):
  the same lr multiplier for every leaf; registers and the pre-norm are the stem's (layer 0)."""
  pytest.importorskip("torch")
  from timm.models.vision_transformer import VisionTransformer  # pylint: disable=import-outside-toplevel
  from timm.optim import param_groups_layer_decay  # pylint: disable=import-outside-toplevel

  d = 0.5
  reference = VisionTransformer(
    img_size=IMAGE, patch_size=4, embed_dim=32, depth=DEPTH, num_heads=2, mlp_ratio=2,
    reg_tokens=2, pre_norm=True, global_pool="avg", fc_norm=True, num_classes=10,
  )  # fmt: skip
  theirs = {}
  for group in param_groups_layer_decay(reference, weight_decay=0.05, layer_decay=d):
    names = {id(p): n for n, p in reference.named_parameters()}
    theirs.update({names[id(p)]: group["lr_scale"] for p in group["params"]})
  model = vit.build({"variant": "Pico/4", "num_classes": 10, "num_registers": 2, "pre_norm": True})
  images = jnp.zeros((1, IMAGE, IMAGE, 3))
  shapes = jax.eval_shape(lambda k: model.init(k, images, train=False)["params"], jax.random.key(0))
  ours = _paths(optim.layer_decay_scales(shapes, DEPTH, d))
  stem_and_head = {
    "cls": "cls_token",
    "registers": "reg_token",
    "pos_embedding": "pos_embed",
    "embedding/kernel": "patch_embed.proj.weight",  # timm's norm_pre ViT has no patch bias
    "pre_norm/scale": "norm_pre.weight",
    "pre_norm/bias": "norm_pre.bias",
    "fc_norm/scale": "fc_norm.weight",
    "fc_norm/bias": "fc_norm.bias",
    "head/kernel": "head.weight",
    "head/bias": "head.bias",
  }
  for path, name in stem_and_head.items():
    assert float(ours[path]) == pytest.approx(theirs[name]), path
  for i in range(DEPTH):
    block = {round(s, 9) for n, s in theirs.items() if n.startswith(f"blocks.{i}.")}
    assert block == {round(float(s), 9) for p, s in ours.items() if f"encoderblock_{i}/" in p}


# --------------------------------------------------------------- make_optimizer


def _step(tx, params, grads_seq):
  """Applies `tx` for each gradient in turn (jitted: eager optax over a ViT is slow on CPU)."""

  @jax.jit
  def run(params, grads_seq):
    state = tx.init(params)
    for grads in grads_seq:
      updates, state = tx.update(grads, state, params)
      params = optax.apply_updates(params, updates)
    return params

  return run(params, grads_seq)


@pytest.mark.parametrize("layer_decay", [0.75, 1.0])
def test_loop_and_scan_layouts_update_identically(loop_params, layer_decay):
  schedule = optim.make_schedule(
    base_lr=1e-2, batch_size=256, warmup_steps=1, total_steps=10, min_lr=0.0
  )
  kw = dict(
    schedule=schedule,
    b1=0.9,
    b2=0.95,
    eps=1e-8,
    weight_decay=0.05,
    layer_decay=layer_decay,
    depth=DEPTH,
    grad_clip=1.0,
  )
  grads = [_grads(loop_params, seed) for seed in (1, 2, 3)]  # Step 0 has lr 0 (warmup).

  loop = _step(optim.make_optimizer(loop_params, **kw), loop_params, grads)
  scan_params = vit.loop_to_scan(loop_params)
  # The optimizer may be built from the abstract params, as the trainer does.
  tx_scan = optim.make_optimizer(jax.eval_shape(lambda: scan_params), **kw)
  scan = _step(tx_scan, scan_params, [vit.loop_to_scan(g) for g in grads])

  got, want = _paths(vit.scan_to_loop(scan)), _paths(loop)
  assert set(got) == set(want)
  for p in want:
    np.testing.assert_allclose(got[p], want[p], rtol=1e-6, atol=1e-7, err_msg=p)
  # Not vacuous: every leaf moved.
  for p, x in _paths(loop_params).items():
    assert not np.allclose(want[p], x), p


@pytest.mark.parametrize("scan", [False, True])
def test_layer_decay_scales_each_layers_update(loop_params, scan):
  """With layer_decay d, a layer's whole update (Adam step and weight decay) is d**k times d=1's."""
  d = 0.75
  params = vit.loop_to_scan(loop_params) if scan else loop_params
  grads = _grads(params, 7)
  kw = dict(schedule=_constant(0.1), b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05, depth=DEPTH)

  def updates(layer_decay):
    tx = optim.make_optimizer(params, layer_decay=layer_decay, **kw)
    u, _ = jax.jit(lambda g, p: tx.update(g, tx.init(p), p))(grads, params)
    u = vit.scan_to_loop(u) if scan else u
    return _paths(u)

  decayed, plain = updates(d), updates(1.0)
  for p in plain:
    top = p.split("/")[0]
    if top in ("embedding", "pos_embedding", "cls"):
      k = DEPTH + 1
    elif top == "Transformer":
      k = DEPTH - int(p.split("/")[1].split("_")[1])
    else:
      k = 0
    np.testing.assert_allclose(decayed[p], d**k * plain[p], rtol=1e-6, atol=1e-9, err_msg=p)


def _tiny_params():
  return {
    "embedding": {"kernel": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "bias": jnp.array([0.3, -0.7])},
    "Transformer": {
      "encoderblock_0": {
        "Dense_0": {"kernel": jnp.array([[2.0, -1.0, 0.25]]), "bias": jnp.array([1.0, 2.0, -3.0])},
        "LayerNorm_0": {"scale": jnp.array([1.5, 0.5, 1.0])},
      }
    },
    "head": {"kernel": jnp.array([[-1.0], [4.0]]), "bias": jnp.array([0.1])},
  }


@pytest.mark.parametrize("layer_decay", [1.0, 0.5])
def test_adamw_matches_closed_form(layer_decay):
  b1, b2, eps, wd, depth = 0.9, 0.99, 1e-3, 0.1, 1
  p0 = _tiny_params()
  g1 = jax.tree.map(lambda x: jnp.sin(3.0 * x) + 0.2, p0)
  g2 = jax.tree.map(lambda x: jnp.cos(2.0 * x) - 0.4, p0)
  lr = lambda count: 0.1 * (count + 1)
  tx = optim.make_optimizer(
    p0, schedule=lr, b1=b1, b2=b2, eps=eps, weight_decay=wd, layer_decay=layer_decay, depth=depth
  )
  p1, p2 = _step(tx, p0, [g1]), _step(tx, p0, [g1, g2])

  multiplier = {"embedding": layer_decay**2, "Transformer": layer_decay, "head": 1.0}
  flat0, flat1, flat2 = _paths(p0), _paths(p1), _paths(p2)
  fg1, fg2 = _paths(g1), _paths(g2)
  for p in flat0:
    x0, a, b = (np.asarray(t[p], np.float64) for t in (flat0, fg1, fg2))
    decay = wd if p.endswith("kernel") else 0.0  # Decoupled, kernels only.
    scale = multiplier[p.split("/")[0]]
    # Step 1: bias-corrected moments are g and g**2.
    x1 = x0 - 0.1 * scale * (a / (np.abs(a) + eps) + decay * x0)
    m = (1 - b1) * a * b1 + (1 - b1) * b
    v = (1 - b2) * a**2 * b2 + (1 - b2) * b**2
    m_hat, v_hat = m / (1 - b1**2), v / (1 - b2**2)
    x2 = x1 - 0.2 * scale * (m_hat / (np.sqrt(v_hat) + eps) + decay * x1)
    np.testing.assert_allclose(flat1[p], x1, rtol=1e-5, atol=1e-6, err_msg=p)
    np.testing.assert_allclose(flat2[p], x2, rtol=1e-5, atol=1e-6, err_msg=p)


def test_grad_clip_by_global_norm():
  # eps = 1 makes Adam's first step g / (|g| + 1), so it shows the scale of the gradient it saw.
  params = {"a": {"kernel": jnp.zeros(2)}, "b": {"bias": jnp.zeros(1)}}
  grads = {
    "a": {"kernel": jnp.array([3.0, 0.0])},
    "b": {"bias": jnp.array([4.0])},
  }  # Global norm 5.

  def first_update(grad_clip):
    tx = optim.make_optimizer(
      params,
      schedule=_constant(1.0),
      b1=0.9,
      b2=0.999,
      eps=1.0,
      weight_decay=0.0,
      layer_decay=1.0,
      depth=0,
      grad_clip=grad_clip,
    )
    return _paths(jax.jit(lambda g, p: tx.update(g, tx.init(p), p)[0])(grads, params))

  def expected(g):
    return {
      "a/kernel": -g["a"]["kernel"] / (jnp.abs(g["a"]["kernel"]) + 1),
      "b/bias": -g["b"]["bias"] / (jnp.abs(g["b"]["bias"]) + 1),
    }

  clipped = jax.tree.map(lambda g: g / 5.0, grads)  # Scaled together, not leaf by leaf.
  for grad_clip, g in ((1.0, clipped), (None, grads), (10.0, grads)):
    got, want = first_update(grad_clip), expected(g)
    for p in want:
      np.testing.assert_allclose(got[p], want[p], rtol=1e-5, err_msg=f"{grad_clip} {p}")


@pytest.mark.parametrize("layer_decay", [0.0, -0.5, 1.0001, 2.0])
def test_layer_decay_out_of_range(layer_decay):
  params = _tiny_params()
  with pytest.raises(ConfigError) as e:
    optim.make_optimizer(
      params,
      schedule=_constant(0.1),
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      weight_decay=0.05,
      layer_decay=layer_decay,
      depth=1,
    )
  assert e.value.field == "optim.layer_decay"
