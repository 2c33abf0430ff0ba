"""Precomputed teacher targets: stored values, alignment with the examples, resume, the loss, start-up checks."""

import itertools
import json
import os
import shutil
import socket
import subprocess
import sys

import fsspec
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from at_jax import checkpoint, metrics, sharding
from at_jax.data import pipeline, sources, target_store
from at_jax.errors import ConfigError
from at_jax.experiment import job, loop, precompute, runs, stream, validation
from at_jax.experiment import workdir as workdir_claim
from at_jax.models import vit
from at_jax.training import classify as train_step
from at_jax.transfer import spec
from tests.conftest import shrunk_demo, subprocess_env

N, SIZE, BATCH = 37, 28, 16  # 37 examples: the last batch is padded
TEACHER = dict(num_classes=0, patch_size=7, width=32, depth=2, mlp_dim=64, num_heads=2)
VIEW = dict(image_size=SIZE, crop_pct=1.0, normalization="fashion_mnist")
# bfloat16 keeps 8 significant bits: rounding is within 2^-9 relative, plus float noise across batchings.
BF16_RTOL = 2.0**-8


class _Corrupt:
  """`source` whose examples in `bad` hold undecodable image bytes, as a damaged tfds record does."""

  def __init__(self, source, bad):
    self.source, self.bad = source, set(bad)

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    if i in self.bad:
      return sources.to_example({"image": b"\x89PNG garbage", "label": i})
    return self.source[i]


def _source(n=N, seed=0):
  """Fashion-MNIST-like: gray 28 x 28 uint8 images; the label is the example's index."""
  images = np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE), dtype=np.uint8)
  return sources.ArraySource(images, np.arange(n))


def _fixed_view_images(source):
  """What the teacher saw: the eval preprocessing of every example, in order."""
  batch = next(pipeline.eval_iterator(source, global_batch_size=len(source), **VIEW, num_threads=0))
  return batch["image"]


def _sharpened(params, factor):
  """Random-init attention is near uniform, which would hide mistakes: scale q and k up."""
  return jax.tree_util.tree_map_with_path(
    lambda p, x: (
      factor * x
      if [getattr(k, "key", "") for k in p][-2:] in (["query", "kernel"], ["key", "kernel"])
      else x
    ),
    params,
  )


@pytest.fixture(scope="module")
def teacher():
  model = vit.build(TEACHER)
  params = model.init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)), train=False)["params"]
  return model, _sharpened(params, 4)


# What each stored setting keeps: (transfer.what, precompute.store) -> keys.
SETTINGS = {"logits": ("attn", "logits"), "qk": ("attn", "qk"), "v": ("v", "logits")}
KEYS = {"logits": ["attn_logits"], "qk": ["q", "k"], "v": ["v"]}


def _metadata(model, setting, layers=(0, 1), num_examples=N):
  what, store = SETTINGS[setting]
  return precompute.describe(
    model,
    what=what,
    store=store,
    layers=layers,
    **VIEW,
    dataset="fake",
    split="train",
    num_examples=num_examples,
    fingerprint="",
    jpeg_downscale=True,
    teacher_path="random",
    teacher_config=TEACHER,
  )


def _write(teacher, directory, setting, source=None, **kw):
  model, params = teacher
  source = _source() if source is None else source
  return precompute.write_targets(
    model,
    params,
    source,
    str(directory),
    _metadata(model, setting, num_examples=len(source), **kw),
    batch_size=BATCH,
    mesh=sharding.make_mesh(-1, 1),
  )


@pytest.fixture(scope="module")
def stores(teacher, tmp_path_factory):
  """Targets of every setting, written once: {setting: folder}."""
  root = tmp_path_factory.mktemp("targets")
  for setting in SETTINGS:
    _write(teacher, root / setting, setting)
  return {setting: str(root / setting) for setting in SETTINGS}


@pytest.mark.parametrize("store", SETTINGS)
def test_stored_targets_are_the_teacher_on_the_fixed_view(teacher, stores, store):
  model, params = teacher
  source = _source()
  _, out = model.apply({"params": params}, _fixed_view_images(source), train=False, want_qkv=True)
  targets = target_store.TeacherTargets(stores[store])
  meta = targets.metadata
  keys = KEYS[store]
  assert (
    meta["keys"] == keys
    and meta["complete"]
    and meta["done_examples"] == N
    and meta["skipped"] == 0
  )
  assert meta["dtype"] == "bfloat16" and meta["view"] == target_store.TARGETS_VIEW
  for key in keys:
    with open(os.path.join(stores[store], key, "zarr.json")) as f:
      zarr = json.load(f)
    assert zarr["data_type"] == "bfloat16" and zarr["shape"][0] == N
    assert zarr["codecs"][0]["configuration"]["chunk_shape"][0] == 1  # a chunk per example
  for i in range(N):
    row = targets[i]
    for key in keys:
      got = row[f"teacher_{key}"]
      assert got.dtype == ml_dtypes.bfloat16 and list(got.shape) == meta["shapes"][key]
      np.testing.assert_allclose(
        got.astype(np.float32), np.asarray(out[key][:, i]), rtol=BF16_RTOL, atol=1e-6
      )
    if (
      store == "qk"
    ):  # what the step forms from them: q.k / sqrt(Dh), within the bf16 rounding of q and k
      q, k = (row[f"teacher_{key}"].astype(np.float32) for key in keys)
      scale = q.shape[-1] ** -0.5
      logits = np.einsum("sqhd,skhd->shqk", q, k) * scale
      bound = 2 * BF16_RTOL * np.einsum("sqhd,skhd->shqk", np.abs(q), np.abs(k)) * scale
      assert np.all(np.abs(logits - np.asarray(out["attn_logits"][:, i])) <= bound + 1e-5)


def test_targets_in_a_bucket_equal_those_on_disk(teacher, stores, gcs_bucket):
  """transfer.targets_dir=gs://...: tensorstore's GCS driver for the arrays, epath for the metadata."""
  directory = f"{gcs_bucket[0]}/targets_logits"
  _write(teacher, directory, "logits")
  local, remote = (target_store.TeacherTargets(d) for d in (stores["logits"], directory))
  assert remote.metadata == local.metadata and remote.metadata["complete"]
  for i in range(N):
    np.testing.assert_array_equal(remote[i]["teacher_attn_logits"], local[i]["teacher_attn_logits"])
  # An object per shard (a batch's rows: one process here), not one per example.
  shard = remote.metadata["shard_examples"]
  assert shard == BATCH
  objects = fsspec.filesystem("gs").find(f"{directory}/attn_logits/c")
  assert len(objects) == -(-N // shard)


def test_train_iterator_carries_each_examples_targets(stores):
  source = _source()
  targets = target_store.TeacherTargets(stores["logits"])
  kw = dict(global_batch_size=8, seed=3, **VIEW, fixed_view=True, targets=targets, num_threads=2)
  it = pipeline.train_iterator(source, **kw)
  batches = [next(it) for _ in range(6)]  # 48 examples: into the second epoch
  images = _fixed_view_images(source)
  labels = np.concatenate([b["label"] for b in batches])
  assert not np.array_equal(labels[:N], np.arange(N)) and sorted(labels[:N]) == list(
    range(N)
  )  # shuffled
  for b in batches:
    assert b["teacher_attn_logits"].dtype == ml_dtypes.bfloat16
    assert not b["skipped"].any()
    for row, label in enumerate(b["label"]):
      np.testing.assert_array_equal(b["image"][row], images[label])  # the view the teacher saw
      np.testing.assert_array_equal(
        b["teacher_attn_logits"][row], targets[label]["teacher_attn_logits"]
      )
  # Resuming at a step gives the same batches, targets included.
  resumed = pipeline.train_iterator(source, **kw, start_step=4)
  for b in batches[4:]:
    for key, value in next(resumed).items():
      np.testing.assert_array_equal(value, b[key])
  # A subset of the stored layers reads just those.
  last = target_store.TeacherTargets(stores["logits"], layers=[1])
  np.testing.assert_array_equal(
    last[5]["teacher_attn_logits"], targets[5]["teacher_attn_logits"][1:]
  )


def _batch_with_targets(targets: target_store.TeacherTargets) -> dict:
  """The first training batch of `_source()` in the fixed view, carrying its examples' stored targets."""
  batch = next(
    pipeline.train_iterator(
      _source(),
      global_batch_size=BATCH,
      seed=0,
      **VIEW,
      fixed_view=True,
      targets=targets,
      num_threads=0,
    )
  )
  return {k: jnp.asarray(v) for k, v in batch.items() if k != "skipped"}


@pytest.mark.parametrize("store", SETTINGS)
def test_distill_loss_from_stored_targets_equals_jointly_run_teacher(teacher, stores, store):
  model, params = teacher
  student = vit.build({**TEACHER, "num_classes": 10})
  # A sharp student: against near-uniform maps the loss is ~log N whatever the targets.
  student_params = _sharpened(
    student.init(jax.random.key(1), jnp.zeros((1, SIZE, SIZE, 3)), train=False)["params"], 8
  )
  batch = _batch_with_targets(target_store.TeacherTargets(stores[store]))

  def loss(source, fed):
    t = spec.resolve(
      {"mode": "distill", "what": SETTINGS[store][0], "layers": "all", "source": source},
      student,
      model,
      SIZE,
    )
    jointly = source == "jointly"
    loss_fn = train_step.make_loss_fn(student, model if jointly else None, t, label_smoothing=0.1)
    _, aux = loss_fn(student_params, fed, params if jointly else None, jax.random.key(2))
    return {k: float(aux[k]) for k in ("ce_loss", "distill_loss")}

  jointly = loss("jointly", {k: v for k, v in batch.items() if not k.startswith("teacher_")})
  stored = loss("precomputed", batch)
  # Measured: 3e-7 (logits), 1.3e-6 (qk), 3.3e-5 (v: a mean squared error, closer to the rounding) relative.
  rtol = 3e-4 if store == "v" else 2e-5
  np.testing.assert_allclose(stored["ce_loss"], jointly["ce_loss"], rtol=1e-6)
  np.testing.assert_allclose(stored["distill_loss"], jointly["distill_loss"], rtol=rtol)
  # Control: the targets of other examples (each row shifted by one) move it by far more than rtol.
  shifted = loss(
    "precomputed",
    {k: jnp.roll(v, 1, axis=0) if k.startswith("teacher_") else v for k, v in batch.items()},
  )
  assert (
    abs(shifted["distill_loss"] - jointly["distill_loss"]) > 10 * rtol * jointly["distill_loss"]
  )


@pytest.mark.parametrize(
  "store,teacher_fields,student_patch,transfer",
  [
    # A deeper 4-head teacher stored as q and k (layers 1, 3: what uniform reads), grouped heads.
    ("qk", dict(depth=4, num_heads=4), 7, dict(layer_map="uniform", head_map="group")),
    # A patch-4 student from the patch-7 teacher's stored maps: resampled, patch tokens only.
    ("logits", {}, 4, dict(prefix="drop")),
  ],
)
def test_stored_targets_of_another_shape_give_the_jointly_run_loss(
  tmp_path, store, teacher_fields, student_patch, transfer
):
  """Targets stored at the teacher's own layers, heads and tokens reach the student's shape as a jointly
  run teacher's do: the same distillation loss, to bfloat16's rounding."""
  model = vit.build({**TEACHER, **teacher_fields})
  images = jnp.zeros((1, SIZE, SIZE, 3))
  params = _sharpened(model.init(jax.random.key(0), images, train=False)["params"], 4)
  student = vit.build({**TEACHER, "num_classes": 10, "patch_size": student_patch})
  sp = _sharpened(student.init(jax.random.key(1), images, train=False)["params"], 8)
  resolve = lambda source: spec.resolve(
    {"mode": "distill", "layers": "all", "source": source, **transfer}, student, model, SIZE
  )
  layers = tuple(sorted(set(resolve("precomputed").teacher_layers)))
  _write((model, params), tmp_path, store, layers=layers)
  stored = target_store.TeacherTargets(str(tmp_path), resolve("precomputed").teacher_layers)
  batch = _batch_with_targets(stored)
  losses = {}
  for source in ("jointly", "precomputed"):
    t, jointly = resolve(source), source == "jointly"
    loss_fn = train_step.make_loss_fn(student, model if jointly else None, t, label_smoothing=0.1)
    fed = {k: v for k, v in batch.items() if not (jointly and k.startswith("teacher_"))}
    losses[source] = float(
      loss_fn(sp, fed, params if jointly else None, jax.random.key(2))[1]["distill_loss"]
    )
  np.testing.assert_allclose(losses["precomputed"], losses["jointly"], rtol=1e-4)


def test_unreadable_examples_are_skipped_in_precompute_and_training(teacher, tmp_path):
  source = _Corrupt(_source(), bad={5, 20})
  meta = _write(teacher, tmp_path, "logits", source=source)
  assert meta["complete"] and meta["skipped"] == 2
  targets = target_store.TeacherTargets(str(tmp_path))
  with pytest.raises(ValueError, match="missing"):  # never written, so never read as zeros
    targets[5]  # pylint: disable=pointless-statement
  # Training skips them too, even where the pixels would decode: no targets, no example.
  for readable in (source, _source()):
    it = pipeline.train_iterator(
      readable, global_batch_size=8, seed=0, **VIEW, fixed_view=True, targets=targets
    )
    batches = [next(it) for _ in range(5)]  # one epoch and a bit
    labels = np.concatenate([b["label"] for b in batches])
    assert not {5, 20} & set(labels) and sum(b["skipped"].sum() for b in batches) >= 2


def test_precompute_resumes_where_it_stopped(teacher, stores, tmp_path, capsys):
  directory = tmp_path / "targets"
  shutil.copytree(stores["logits"], directory)
  shard_dir = directory / "attn_logits" / "c"
  assert json.load(open(directory / target_store.TARGETS_METADATA))["shard_examples"] == BATCH
  # shard s holds batch s: {s: its object}
  shards = {int(p.relative_to(shard_dir).parts[0]): p for p in shard_dir.rglob("*") if p.is_file()}
  assert sorted(shards) == list(range(-(-N // BATCH)))
  expected = {s: path.read_bytes() for s, path in shards.items()}
  # As if killed after committing the first batch: later rows are missing, the metadata says so.
  meta = json.load(open(directory / target_store.TARGETS_METADATA))
  meta.update(done_examples=BATCH, complete=False)
  json.dump(meta, open(directory / target_store.TARGETS_METADATA, "w"))
  for s, path in shards.items():
    if s >= 1:
      path.unlink()
  with pytest.raises(ConfigError, match="again to finish") as e:
    target_store.TeacherTargets(str(directory))
  assert e.value.field == "transfer.targets_dir"
  before = os.stat(shards[0]).st_mtime_ns
  assert _write(teacher, directory, "logits")["complete"]
  assert os.stat(shards[0]).st_mtime_ns == before  # the done batch is kept
  assert {s: path.read_bytes() for s, path in shards.items()} == expected
  assert "Resuming the precompute" in capsys.readouterr().out
  _write(teacher, directory, "logits")  # complete: returns at once
  assert "nothing to do" in capsys.readouterr().out


def test_a_resume_on_another_process_count_whose_slices_split_a_shard_is_refused(
  teacher, stores, tmp_path
):
  """A store laid out for other per-process slices (here shards of 3, as 3 processes of a batch of
  48 would have it) cannot take this launch's rows of 16 without two writers sharing a shard."""
  directory = tmp_path / "targets"
  shutil.copytree(stores["logits"], directory)
  meta = json.load(open(directory / target_store.TARGETS_METADATA))
  meta.update(done_examples=BATCH, complete=False, shard_examples=3)
  json.dump(meta, open(directory / target_store.TARGETS_METADATA, "w"))
  with pytest.raises(ConfigError, match="shards of 3 examples, which do not divide") as e:
    _write(teacher, directory, "logits")
  assert e.value.field == "transfer.targets_dir"


def test_precompute_refuses_a_folder_of_another_setting(teacher, stores, tmp_path):
  directory = tmp_path / "targets"
  shutil.copytree(stores["logits"], directory)
  with pytest.raises(ConfigError, match="differing: layers, shapes") as e:
    _write(teacher, directory, "logits", layers=(1,))
  assert e.value.field == "transfer.targets_dir"
  meta = json.load(open(directory / target_store.TARGETS_METADATA))
  meta.update(done_examples=BATCH, complete=False)
  json.dump(meta, open(directory / target_store.TARGETS_METADATA, "w"))
  model, params = teacher
  with pytest.raises(ConfigError) as e:
    precompute.write_targets(
      model,
      params,
      _source(),
      str(directory),
      _metadata(model, "logits"),
      batch_size=8,
      mesh=sharding.make_mesh(-1, 1),
    )
  assert e.value.field == "data.eval_batch_size"


def test_reader_and_iterator_refuse_mismatches(stores, tmp_path):
  with pytest.raises(ConfigError, match="launch/precompute.py") as e:
    target_store.TeacherTargets(str(tmp_path))
  assert e.value.field == "transfer.targets_dir"
  with pytest.raises(ConfigError) as e:
    target_store.TeacherTargets(stores["logits"], layers=[0, 5])
  assert e.value.field == "transfer.layers"
  targets = target_store.TeacherTargets(stores["logits"])
  base = dict(global_batch_size=8, seed=0, **VIEW, fixed_view=True, targets=targets)
  for change, field in (
    (dict(fixed_view=False), "fixed_view"),
    (dict(crop_pct=0.875), "data.crop_pct"),
    (dict(image_size=21), "data.image_size"),
    (dict(normalization="unit"), "data.normalization"),
    (dict(randaugment="rand-m9-mstd0.5-inc1"), "data.randaugment"),
    (dict(random_erase=0.25), "data.random_erase"),
    (dict(jpeg_downscale=False), "data.jpeg_downscale"),
  ):
    with pytest.raises(ConfigError) as e:
      pipeline.train_iterator(_source(), **{**base, **change})
    assert e.value.field == field, change
  edited = _source()
  edited.fingerprint = f"{N}:0123456789abcdef"  # as an image folder's, whose files changed
  with pytest.raises(ConfigError) as e:
    pipeline.train_iterator(edited, **base)
  assert e.value.field == "data.dir"
  with pytest.raises(ConfigError) as e:
    pipeline.train_iterator(_source(n=N - 1), **base)
  assert e.value.field == "data.train_split"
  with pytest.raises(ConfigError) as e:
    precompute.stored_keys("attn", "maps")
  assert e.value.field == "precompute.store"


# ----------------------------------------------------------------------------
# Through the config: launch/precompute.py's `run`, validate's checks, and a training run.


def _fake_make_source(name, split, data_dir=None, **options):
  """Small random stand-ins for the config's splits, so that no dataset is needed."""
  del name, data_dir, options
  return _source(n=64, seed=1) if split.startswith("train") else _source(n=40, seed=2)


@pytest.fixture
def fake_fashion_mnist(monkeypatch):
  monkeypatch.setattr(sources, "make_source", _fake_make_source)


def _config(teacher_dir, **transfer_fields):
  """The demo config shrunk to seconds, distilling layer 0 from stored targets."""
  c = shrunk_demo(steps=4, **{"source": "precomputed", **transfer_fields})
  c.model.num_classes = 64  # _fake_make_source labels each of its 64 examples by its index
  c.data.update(dict(eval_batch_size=16, train_split="train[:64]", eval_split="test[:40]"))
  c.teacher.init = teacher_dir
  return c


@pytest.fixture(scope="module")
def precomputed(tmp_path_factory):
  """(teacher export, workdir): a random Pico/7 teacher's params export, and a workdir holding its targets
  for `_config`, written by `precompute.run` (launch/precompute.py) into the default place."""
  root = tmp_path_factory.mktemp("pico")
  export = str(root / "params")
  model_config = vit.model_fields(vit.build({"variant": "Pico/7", "num_classes": 0}))
  params = vit.build(model_config).init(
    jax.random.key(5), jnp.zeros((1, SIZE, SIZE, 3)), train=False
  )["params"]
  checkpoint.save_params(export, jax.device_get(params), model_config)
  workdir = str(root / "run")
  with pytest.MonkeyPatch.context() as m:
    m.setattr(sources, "make_source", _fake_make_source)
    with pytest.raises(ConfigError, match="launch/precompute.py") as e:
      validation.validate(_config(export), workdir)
    assert e.value.field == "transfer.targets_dir"
    meta = precompute.run(_config(export), workdir)
  assert meta["complete"] and meta["layers"] == [0] and meta["num_examples"] == 64
  assert meta["teacher"] == export and meta["teacher_config"]["depth"] == 2
  return export, workdir


def test_precompute_holds_the_workdir(precomputed, fake_fashion_mnist, tmp_path):
  """A workdir in use (a training run, or another precompute) is refused before anything is computed;
  precompute would otherwise train its teacher, or write its targets, beside that run."""
  export, _ = precomputed
  lock = workdir_claim.WorkdirLock(str(tmp_path))
  lock.acquire()
  try:
    with pytest.raises(ConfigError, match="in use by another run"):
      precompute.run(_config(export), str(tmp_path))
  finally:
    lock.release()
  assert sorted(os.listdir(tmp_path)) == []


@pytest.mark.slow
@pytest.mark.parametrize("until", [1.0, 0.5])
def test_train_with_stored_targets(precomputed, fake_fashion_mnist, tmp_path, capsys, until):
  """Distilling from stored targets every step, or (until=0.5 of 4) steps 1-2, then labels alone."""
  export, targets_workdir = precomputed
  c = _config(
    export, targets_dir=os.path.join(targets_workdir, target_store.TARGETS_DIR), until=until
  )
  workdir = str(tmp_path)
  evals = loop.train_and_evaluate(c, workdir)
  assert 0 <= evals["top1"] <= 100
  out = capsys.readouterr().out
  assert "Teacher targets: attn_logits" in out and "replaces random-resized crop and flip" in out
  assert ("read for steps 1-2, the distilling ones" in out) == (until < 1), out
  # The estimate charges the targets the batches carry, and no teacher: the run holds none.
  estimate = next(x for x in out.splitlines() if x.startswith("per-device memory estimate"))
  assert "stored_targets" in estimate and " teacher " not in estimate, estimate
  lines = [
    x for x in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "train/loss" in x
  ]
  assert [x["step"] for x in lines] == [2, 4]
  assert all(x["train/skipped_examples"] == 0 for x in lines)
  distilled = [x["train/distill_loss"] > 0 for x in lines]
  assert distilled == [True, until == 1.0], lines
  if until == 1.0:  # the attention report runs the stored targets' teacher, named by teacher.init
    job.attention_report(c, workdir)
    assert os.path.exists(os.path.join(workdir, "attention.png"))
    assert "attention maps:" in capsys.readouterr().out
    c.teacher.init = ""
    job.attention_report(c, workdir)
    assert "no attention report" in capsys.readouterr().out


def test_a_distillation_that_stops_reads_no_stored_targets_after_it(
  precomputed, fake_fashion_mnist, tmp_path
):
  """transfer.until=0.5 of 4 steps: the batches of steps 1-2 carry their stored targets, those of 3-4
  the same images (the fixed view) without them; a resume past the switch reads none either."""
  export, targets_workdir = precomputed
  targets_dir = os.path.join(targets_workdir, target_store.TARGETS_DIR)
  run, throughout = (
    runs.setup(_config(export, targets_dir=targets_dir, until=until), str(tmp_path / str(until)))
    for until in (0.5, 1.0)
  )
  stopping = list(itertools.islice(stream.train_batches(run, 0), 4))
  reference = list(itertools.islice(stream.train_batches(throughout, 0), 4))
  assert [("teacher_attn_logits" in b) for b in stopping] == [True, True, False, False]
  for got, want in zip(stopping, reference):
    for key, value in got.items():
      np.testing.assert_array_equal(value, want[key])
  resumed = next(stream.train_batches(run, 3))
  assert resumed.keys() == stopping[3].keys()
  np.testing.assert_array_equal(resumed["image"], reference[3]["image"])


@pytest.mark.slow
def test_train_from_a_deeper_teachers_stored_targets(fake_fashion_mnist, tmp_path):
  """launch/precompute.py and a run of a config whose teacher has another depth and head count: the
  store holds the teacher layers `uniform` reads, at its heads; the run maps them as it reads them."""
  fields = vit.model_fields(
    vit.build({"variant": "Pico/7", "num_classes": 0, "depth": 4, "num_heads": 4})
  )
  params = vit.build(fields).init(jax.random.key(5), jnp.zeros((1, SIZE, SIZE, 3)), train=False)
  export = str(tmp_path / "teacher")
  checkpoint.save_params(export, jax.device_get(params["params"]), fields)
  c = _config(export, layers="all", layer_map="uniform", head_map="group")
  meta = precompute.run(c, str(tmp_path / "run"))
  assert meta["layers"] == [1, 3] and meta["num_heads"] == 4
  loop.train_and_evaluate(c, str(tmp_path / "run"))
  lines = metrics.read_jsonl(str(tmp_path / "run" / "metrics.jsonl"))
  assert all(x["train/distill_loss"] > 0 for x in lines if "train/distill_loss" in x)
  c.transfer.head_map = "same"  # 2 student heads cannot read 4 stored ones head by head
  with pytest.raises(ConfigError) as e:
    validation.validate(c, str(tmp_path / "run"))
  assert e.value.field == "transfer.head_map"


@pytest.mark.parametrize(
  "change, field",
  [
    (dict(data=dict(mixup=0.8)), "data.mixup"),
    (dict(data=dict(cutmix=1.0)), "data.cutmix"),
    (dict(data=dict(randaugment="rand-m9-mstd0.5-inc1")), "data.randaugment"),
    (dict(data=dict(random_erase=0.25)), "data.random_erase"),
    (dict(transfer=dict(average="images")), "transfer.average"),
    (dict(data=dict(crop_pct=0.875)), "data.crop_pct"),
    (dict(data=dict(train_split="train[:32]")), "data.train_split"),
    (dict(data=dict(normalization="unit")), "data.normalization"),
    (dict(transfer=dict(layers="all")), "transfer.layers"),
    (dict(transfer=dict(what="q")), "transfer.what"),
    (dict(transfer=dict(loss_impl="blockwise")), "transfer.loss_impl"),  # logits stored, not q/k
  ],
)
def test_validate_names_what_disagrees_with_the_stored_targets(
  precomputed, fake_fashion_mnist, change, field
):
  export, workdir = precomputed
  c = _config(export)
  validation.validate(c, workdir)  # as written: fine
  for namespace, fields in change.items():
    c[namespace].update(fields)
  with pytest.raises(ConfigError) as e:
    validation.validate(c, workdir)
  assert e.value.field == field


def test_stored_targets_of_another_teacher_are_refused_or_said(
  precomputed, fake_fashion_mnist, tmp_path, capsys
):
  """The run distils the store's teacher: a config naming one of another architecture is refused;
  the same architecture elsewhere (a moved export, another checkpoint of the model) is said."""
  export, workdir = precomputed
  deeper = str(tmp_path / "deeper_teacher")
  fields = vit.model_fields(vit.build({"variant": "Pico/7", "num_classes": 0, "depth": 3}))
  params = vit.build(fields).init(jax.random.key(6), jnp.zeros((1, SIZE, SIZE, 3)), train=False)
  checkpoint.save_params(deeper, jax.device_get(params["params"]), fields)
  with pytest.raises(
    ConfigError, match=f"holds the targets of the teacher {export}, of another"
  ) as e:
    validation.validate(_config(deeper), workdir)
  assert e.value.field == "teacher.init" and "depth" in e.value.message
  moved = str(tmp_path / "moved_teacher")
  shutil.copytree(export, moved)
  capsys.readouterr()
  validation.validate(_config(moved), workdir)
  assert f"the stored targets are of {export} (the same architecture)" in capsys.readouterr().out


def test_precompute_refuses_modes_without_a_distilled_target(
  precomputed, fake_fashion_mnist, tmp_path
):
  with pytest.raises(ConfigError) as e:
    precompute.run(_config(precomputed[0], mode="copy", source="jointly"), str(tmp_path))
  assert e.value.field == "transfer.mode"


requires_fashion_mnist = pytest.mark.skipif(
  not os.path.isdir(sources.FASHION_MNIST_SYSTEM_DIR),
  reason="needs `sudo apt-get install dataset-fashion-mnist`",
)


@requires_fashion_mnist
@pytest.mark.slow
def test_two_processes_write_what_one_does(precomputed, tmp_path):
  """launch/precompute.py on two processes (4 devices each, over loopback), each writing its slices of the
  batches, stores what one 8-device process stores."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  args = [
    os.path.join(root, "launch", "precompute.py"),
    "--config.model.variant=Pico/7",
    f"--config.teacher.init={precomputed[0]}",
    "--config.transfer.layers=all",
    "--config.data.train_split=train[:600]",
    "--config.data.eval_batch_size=80",
    "--config.data.num_threads=0",
    "--config.mesh.data=4",
    "--config.mesh.fsdp=2",
    "--config.precompute.store=qk",
  ]

  def launch(workdir, devices, *extra):
    env = subprocess_env(devices)
    return subprocess.Popen(
      [sys.executable, *args, f"--workdir={workdir}", *extra],
      cwd=root,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = [launch(tmp_path / "one", 8)] + [
    launch(
      tmp_path / "two",
      4,
      "--multihost",
      f"--coordinator=127.0.0.1:{port}",
      "--num_processes=2",
      f"--process_id={i}",
    )
    for i in range(2)
  ]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert "Done: 600 examples" in outs[1][0] and "Done" not in outs[2][0]  # process 0 reports
  one, two = (
    target_store.TeacherTargets(str(tmp_path / w / target_store.TARGETS_DIR))
    for w in ("one", "two")
  )
  # A shard is one process's rows of a batch: half as many examples with two processes.
  assert one.metadata.pop("shard_examples") == 2 * two.metadata.pop("shard_examples")
  assert one.metadata == two.metadata and one.metadata["keys"] == ["q", "k"]
  for i in range(600):
    for key, value in one[i].items():
      assert value.any()
      np.testing.assert_array_equal(two[i][key], value)
