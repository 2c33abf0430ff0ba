"""Attention distillation into a model that is not ours: capture the pre-softmax attention logits of
flax's attention modules inside any user model, and score them against our teacher's maps.

Use::

  out, captured = capture.apply_linen(model, {"params": params}, images)  # a linen model
  out, captured = capture.call_nnx(model, images)                        # an NNX model
  teacher_LBHNN = capture.teacher_attention(teacher, teacher_params, images)
  loss = capture.distill_loss(captured, teacher_LBHNN, pairs={0: 0, 1: 1})

`captured` holds, in call order, the logits [B, H, N, N] of every `nn.MultiHeadDotProductAttention`
(linen, subclasses such as `nn.SelfAttention` included) and every `nnx.MultiHeadAttention` that ran;
`captured.names` are their module paths. `distill_loss` is the paper's: weight (3.0) times, summed over
the paired layers, the cross-entropy between softmax(teacher logits) and the user layer's attention over
keys, averaged over batch, heads and queries (`loss.attention_cross_entropy`).

Why interception, not a capturing `attention_fn`. Both modules take an `attention_fn` argument, and a
capturing one would see exactly the q and k the layer attends with. But handing it over means changing
the user's model (every attention module rebuilt with it), and the function alone has nowhere to put
what it captured: linen passes it the module (to `sow` into) only under `sow_weights=True`, and a Python
list outside the trace leaks tracers under `nn.scan`/`nn.remat`. Interception needs no change to the
model: `apply_linen` runs `apply` under `nn.intercept_methods`, and `call_nnx` walks the NNX graph (NNX
has no method interceptors; its modules are plain objects) and runs the call under `nnx.capture`. Either
way, for the length of the call only, each attention module's own `attention_fn` is wrapped: the wrapper
forms the logits from the q, k, mask and dtype the module passes (flax's formula: q / sqrt(d) . k, plus
bias, masked to the dtype's minimum), `sow`s them, and calls the original function, so the output is
untouched. The sown logits are a function of the same traced q and k, so the loss's gradient reaches
the query/key params; under `jit` XLA forms the forward pass's repeated q.k once. Sowing is the
modules' own functional side channel: it works under `jit`/`grad`, `nn.remat` and `nn.scan` (whose
`variable_axes` must then list `COLLECTION`: 0; its stacked logits are split back into layers).
`nnx.capture` carries the values out of plain NNX code and `nnx.jit`/`nnx.grad` or `jax.jit` around
`nnx.merge`, but not out of `nnx.remat`/`nnx.scan` inside the model: a module that ran and whose logits
did not come back is an error, never a silently shorter list.

Refused, with an error naming the module: an attention module whose `attention_fn` is not flax's own
`dot_product_attention` (what a custom function does to its logits is unknown). Not seen: attention
written by hand (no flax module); a model with none raises. Such a model can form its logits itself and
pass `Captured(names, logits)` to `distill_loss`.
"""

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx, struct

from at_jax.models import vit
from at_jax.transfer import loss, targets

Array = jax.Array
COLLECTION = "attention_capture"  # the linen collection the logits are sown into
SOWN = "logits"  # their name in it (and on each NNX attention module)
DEFAULT_WEIGHT = 3.0  # the paper's distillation weight


class AttentionCapture(nnx.Intermediate):
  """The NNX variable type of captured logits: apart from the user's own `nnx.Intermediate`s."""


@struct.dataclass
class Captured:
  """Pre-softmax attention logits of a user model's attention layers, in call order.

  `names[i]` is layer i's module path ("Block_0/MultiHeadDotProductAttention_0", "blocks/0/attn"; a
  module called k times, or scanned over k layers, gives k layers "<path>[j]"); `logits[i]` its float32
  [B, H, N, N]. A pytree (names are static), so it may cross a `jit` boundary.
  """

  names: tuple[str, ...] = struct.field(pytree_node=False)
  logits: tuple[Array, ...]


def _logits(
  query_NHK: Array,
  key_NHK: Array,
  bias: Array | None = None,
  mask: Array | None = None,
  dtype: Any = None,
  precision: Any = None,
  is_causal: bool = False,
) -> Array:
  """float32 [..., H, Nq, Nk]: the logits flax's `dot_product_attention` (linen's and NNX's) feeds its
  softmax, by the same steps (scale q, then q.k, bias, mask) so that the two agree to rounding."""
  dtype = jnp.dtype(dtype) if dtype is not None else jnp.result_type(query_NHK, key_NHK)
  query_NHK, key_NHK = query_NHK.astype(dtype), key_NHK.astype(dtype)
  # NNX's grouped-query attention: each key head serves a group of query heads.
  if key_NHK.shape[-2] != query_NHK.shape[-2]:
    key_NHK = jnp.repeat(key_NHK, query_NHK.shape[-2] // key_NHK.shape[-2], axis=-2)
  query_NHK = query_NHK / jnp.sqrt(query_NHK.shape[-1]).astype(dtype)
  logits_HNN = jnp.einsum("...qhd,...khd->...hqk", query_NHK, key_NHK, precision=precision)
  if bias is not None:
    logits_HNN = logits_HNN + bias
  masks = [] if mask is None else [mask]
  if is_causal:
    masks.append(jnp.tril(jnp.ones(logits_HNN.shape[-2:], bool)))
  for keep in masks:  # as flax: masked keys get the dtype's minimum, not -inf
    logits_HNN = jnp.where(keep, logits_HNN, jnp.finfo(dtype).min)
  return logits_HNN.astype(jnp.float32)


def _capturing(
  original: Callable[..., Array],
  sow: Callable[[Array], Any],
  path: tuple[Any, ...],
  seen: dict[tuple[Any, ...], int],
) -> Callable[..., Array]:
  """`original` (flax's attention function) that first sows the logits it attends with.

  `seen` records, in call order, each calling module's path and its logits' rank (a scan over layers
  hands back one more axis). `functools.wraps` keeps the signature linen filters keyword arguments by.
  """
  signature = inspect.signature(original)

  @functools.wraps(original)
  def capturing(*args: Any, **kwargs: Any) -> Array:
    given = signature.bind(*args, **kwargs).arguments
    names = ("bias", "mask", "dtype", "precision", "is_causal")
    logits_HNN = _logits(given["query"], given["key"], **{k: given[k] for k in names if k in given})
    seen.setdefault(path, logits_HNN.ndim)
    sow(logits_HNN)
    return original(*args, **kwargs)

  capturing.at_jax_capturing = True  # type: ignore[attr-defined]
  return capturing


def _check_fn(attention_fn: Callable[..., Any], flax_fn: Callable[..., Any], name: str) -> None:
  if attention_fn is not flax_fn:
    raise ValueError(
      f"{name}: its attention_fn is {getattr(attention_fn, '__name__', attention_fn)!r}, not flax's "
      "dot_product_attention, so the logits it attends with are unknown to capture; form them in your "
      "attention_fn and pass capture.Captured(names, logits) to distill_loss instead"
    )


def _name(path: tuple[Any, ...]) -> str:
  return "/".join(map(str, path)) or "<root>"


def _sown(state: Mapping[str, Any], path: tuple[Any, ...]) -> tuple[Array, ...] | None:
  node: Any = state
  for part in (*path, SOWN):
    if not isinstance(node, Mapping) or part not in node:
      return None
    node = node[part]
  return tuple(node)


def _collect(state: Mapping[str, Any], seen: dict[tuple[Any, ...], int]) -> Captured:
  """The sown logits of each module in `seen`, in the order each first ran, as one `Captured`."""
  if not seen:
    raise ValueError(
      "no flax attention module ran in the model: capture sees nn.MultiHeadDotProductAttention (linen) "
      "and nnx.MultiHeadAttention; a hand-written attention must pass its own logits to distill_loss "
      "as capture.Captured(names, logits)"
    )
  names, logits = [], []
  for path, rank in seen.items():
    values = _sown(state, path)
    if not values:
      raise ValueError(
        f"{_name(path)} ran but its attention logits did not come back: inside nn.scan, add "
        f"'{COLLECTION}': 0 to the scan's variable_axes; nnx.scan/nnx.remat inside the model are not "
        "supported (nnx.capture does not reach into them)"
      )
    # A scan over layers stacks its layers' logits along a new leading axis: one layer each.
    layers = [x for v in values for x in (list(v) if v.ndim == rank + 1 else [v])]
    for j, x in enumerate(layers):
      names.append(_name(path) + (f"[{j}]" if len(layers) > 1 else ""))
      logits.append(x)
  return Captured(tuple(names), tuple(logits))


def _linen_interceptor(seen: dict[tuple[Any, ...], int]) -> Callable[..., Any]:
  def interceptor(next_fun: Callable[..., Any], args: Any, kwargs: Any, context: Any) -> Any:
    module = context.module
    if not (
      isinstance(module, nn.MultiHeadDotProductAttention) and context.method_name == "__call__"
    ):
      return next_fun(*args, **kwargs)
    path = tuple(module.scope.path)
    original = module.attention_fn
    if getattr(original, "at_jax_capturing", False):
      # A subclass's __call__ calling its base's (nn.SelfAttention): already wrapped, once is enough.
      return next_fun(*args, **kwargs)
    _check_fn(original, nn.dot_product_attention, _name(path))
    sow = functools.partial(module.sow, COLLECTION, SOWN)
    # A linen module's fields are frozen after construction; the swap lasts this one call.
    object.__setattr__(module, "attention_fn", _capturing(original, sow, path, seen))
    try:
      return next_fun(*args, **kwargs)
    finally:
      object.__setattr__(module, "attention_fn", original)

  return interceptor


def _mutable_list(mutable: bool | str | Sequence[str]) -> bool | list[str]:
  """linen's `mutable` with `COLLECTION` added (True: everything is mutable already)."""
  if mutable is True:
    return True
  own = [] if mutable is False else [mutable] if isinstance(mutable, str) else list(mutable)
  return [COLLECTION, *own]


def apply_linen(
  module: nn.Module,
  variables: Mapping[str, Any],
  *args: Any,
  mutable: bool | str | Sequence[str] = False,
  **kwargs: Any,
) -> tuple[Any, Captured]:
  """`module.apply(variables, *args, mutable=mutable, **kwargs)` and the attention logits captured in it.

  Returns (what `apply` returns, with the user's `mutable` as given, `Captured`). Call it inside the
  loss function (under `jit`/`grad` as usual): the logits are traced values of this call.
  """
  seen: dict[tuple[Any, ...], int] = {}
  variables = {k: v for k, v in variables.items() if k != COLLECTION}  # no stale logits
  with nn.intercept_methods(_linen_interceptor(seen)):
    out, state = module.apply(variables, *args, mutable=_mutable_list(mutable), **kwargs)
  state = dict(state)
  captured = _collect(state.pop(COLLECTION, {}), seen)
  return (out if mutable is False else (out, state)), captured


def call_nnx(model: nnx.Module, *args: Any, **kwargs: Any) -> tuple[Any, Captured]:
  """`model(*args, **kwargs)` and the attention logits captured in it: (its output, `Captured`)."""
  found = [(p, m) for p, m in nnx.iter_modules(model) if isinstance(m, nnx.MultiHeadAttention)]
  for path, module in found:
    _check_fn(module.attention_fn, nnx.dot_product_attention, _name(tuple(path)))
  seen: dict[tuple[Any, ...], int] = {}
  try:
    for path, module in found:
      sow = functools.partial(module.sow, AttentionCapture, SOWN)
      module.attention_fn = _capturing(module.attention_fn, sow, tuple(path), seen)
    run = nnx.capture(lambda m, *a, **k: m(*a, **k), AttentionCapture)
    out, state = run(model, *args, **kwargs)
  finally:  # the model leaves as it came, also when the call fails
    for _, module in found:
      module.attention_fn = nnx.dot_product_attention
  return out, _collect(nnx.to_pure_dict(state), seen)


def teacher_attention(
  teacher: vit.ViT,
  teacher_params: Any,
  images_BYXC: Array,
  layers: Sequence[int] | None = None,
) -> Array:
  """Our frozen teacher's pre-softmax attention [S, B, H, N, N] on `images_BYXC`, in `layers` (default:
  all, then S = L), in eval mode and with no gradient. `teacher` is `vit.build(model_config)`; the
  params come from a params export (`checkpoint.load_params`) or a converted checkpoint."""
  layers = tuple(range(teacher.depth)) if layers is None else tuple(layers)
  keys = ("attn_logits",)
  return targets.teacher_outputs(teacher, teacher_params, images_BYXC, layers, keys)["attn_logits"]


def resolve_pairs(
  captured: Captured, teacher_layers: int, pairs: Mapping[int | str, int] | None
) -> tuple[tuple[int, int], ...]:
  """((user layer index, teacher layer index), ...) from `pairs` {user layer: teacher layer}.

  A user layer is its index in `captured` (call order) or its name (`captured.names`); a teacher layer
  indexes the first axis of the teacher's stack. None pairs layer i with layer i, all of them, and
  needs as many user layers as teacher layers.
  """
  count = len(captured.names)
  if pairs is None:
    if count != teacher_layers:
      raise ValueError(
        f"the model has {count} attention layers {list(captured.names)}, the teacher's stack "
        f"{teacher_layers}: pass pairs={{user layer: teacher layer}} to say which distils which"
      )
    return tuple((i, i) for i in range(count))
  resolved = []
  for user, teacher in pairs.items():
    if isinstance(user, str) and user not in captured.names:
      raise ValueError(
        f"pairs: no attention layer {user!r}; the model's are {list(captured.names)}"
      )
    index = captured.names.index(user) if isinstance(user, str) else user
    if not 0 <= index < count:
      raise ValueError(f"pairs: user layer {user!r} is not in [0, {count}) {list(captured.names)}")
    if not 0 <= teacher < teacher_layers:
      raise ValueError(f"pairs: teacher layer {teacher!r} is not in [0, {teacher_layers})")
    resolved.append((index, teacher))
  if len({i for i, _ in resolved}) != len(resolved):
    raise ValueError(f"pairs: a user layer appears twice in {dict(pairs)}")
  return tuple(resolved)


def _check_shapes(
  name: str, student: tuple[int, ...], teacher: int, shape: tuple[int, ...]
) -> None:
  """Refuses a user layer and a teacher layer whose maps do not pair up entry by entry."""
  if len(student) != 4 or len(shape) != 4:
    raise ValueError(
      f"{name}: logits {student}, teacher layer {teacher}'s {shape}: want [B, H, N, N]"
    )
  checks = (
    (student[0] == shape[0], "batch", "run the teacher on the same images"),
    (
      student[1] == shape[1],
      "heads",
      f"distillation pairs heads one to one: give {name} {shape[1]}",
    ),
    (
      student[2:] == shape[2:],
      "tokens",
      "the teacher sees (image / patch)^2 patches plus its cls/register tokens: match its image "
      "size, patch size and prefix tokens",
    ),
  )
  for same, label, fix in checks:
    if not same:
      raise ValueError(
        f"{name} and teacher layer {teacher} differ in {label}: [B, H, N, N] {student} vs {shape}; "
        f"{fix}"
      )


def distill_loss(
  captured: Captured,
  teacher_LBHNN: Array,
  pairs: Mapping[int | str, int] | None = None,
  *,
  weight: float = DEFAULT_WEIGHT,
) -> Array:
  """The paper's attention-distillation loss: `weight` times, summed over the paired layers, the
  cross-entropy between softmax(teacher logits) and the user layer's attention over keys, mean over
  batch, heads and queries. `teacher_LBHNN`: the teacher's stack (`teacher_attention`); `pairs` as in
  `resolve_pairs`. The teacher gets no gradient; the user's logits do."""
  total = jnp.zeros((), jnp.float32)
  for user, teacher in resolve_pairs(captured, teacher_LBHNN.shape[0], pairs):
    student_BHNN, teacher_BHNN = captured.logits[user], teacher_LBHNN[teacher]
    _check_shapes(captured.names[user], student_BHNN.shape, teacher, teacher_BHNN.shape)
    total = total + loss.attention_cross_entropy(teacher_BHNN, student_BHNN).mean()
  return weight * total
