"""One run per workdir: the lock (two processes, on disk and in the emulated bucket; stale locks taken
over; a live foreign holder refused), the run identity (a changed field refused by name, an override
recorded), metrics.jsonl cut back to the resumed step."""

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from at_jax import metrics, storage
from at_jax.errors import ConfigError
from at_jax.experiment import workdir
from tests.conftest import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _holder(path: str) -> dict:
  with storage.open_file(os.path.join(path, workdir.LOCK_FILE)) as f:
    return json.loads(f.read())


def _write_holder(path: str, **fields) -> None:
  holder = dict(
    host="other-host", pid=1, started=0.0, heartbeat=time.time(), token="t0", command="x"
  )
  storage.write_atomic(os.path.join(path, workdir.LOCK_FILE), json.dumps({**holder, **fields}))


def test_a_second_lock_on_this_host_is_refused_naming_the_holder(tmp_path):
  first = workdir.WorkdirLock(str(tmp_path))
  first.acquire()
  try:
    with pytest.raises(ConfigError, match=rf"in use by another run \(host .*, pid {os.getpid()}"):
      workdir.WorkdirLock(str(tmp_path)).acquire()
  finally:
    first.release()
  assert not os.path.exists(tmp_path / workdir.LOCK_FILE)
  second = workdir.WorkdirLock(str(tmp_path))
  second.acquire()  # free again
  second.release()


def test_a_workdir_inside_a_held_one_is_locked_too(tmp_path):
  """The job's teacher workdir (<workdir>/teacher) is locked while the job trains there, so a launch
  straight into it is refused; and a launch already there stops the job that would train there."""
  teacher = tmp_path / "teacher"
  with workdir.claimed(str(tmp_path)):
    with workdir.claimed(str(teacher)):
      assert _holder(str(teacher))["pid"] == os.getpid()
      with pytest.raises(ConfigError, match="in use by another run"):
        workdir.WorkdirLock(str(teacher)).acquire()
      with workdir.claimed(str(teacher)):  # the same workdir again: re-entrant
        pass
    assert not os.path.exists(teacher / workdir.LOCK_FILE)
    _write_holder(str(teacher), host=workdir._HOST, pid=os.getpid(), token="a-launch-in-teacher")
    with pytest.raises(ConfigError, match="in use by another run"), workdir.claimed(str(teacher)):
      pass


def test_stale_locks_are_taken_over_without_a_person(tmp_path, capsys):
  # A crashed run on this host: its process is gone.
  dead = subprocess.run(
    [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True
  )
  _write_holder(str(tmp_path), host=workdir._HOST, pid=int(dead.stdout), token="crashed")
  lock = workdir.WorkdirLock(str(tmp_path))
  lock.acquire()
  assert _holder(str(tmp_path))["token"] == lock.me.token
  assert "Taking over the stale lock" in capsys.readouterr().out
  lock.release()
  # A run on another host whose heartbeat stopped: taken over once it is `stale_s` old.
  _write_holder(str(tmp_path), heartbeat=time.time() - 5, token="silent")
  lock = workdir.WorkdirLock(str(tmp_path), stale_s=2)
  lock.acquire()
  assert _holder(str(tmp_path))["token"] == lock.me.token
  lock.release()


def test_a_live_run_on_another_host_is_waited_for_then_refused(tmp_path):
  _write_holder(str(tmp_path), token="alive")
  stop = threading.Event()

  def beat():  # the other host's heartbeat
    while not stop.wait(0.1):
      _write_holder(str(tmp_path), token="alive")

  thread = threading.Thread(target=beat)
  thread.start()
  try:
    start = time.monotonic()
    with pytest.raises(ConfigError, match="in use by another run \\(host other-host"):
      workdir.WorkdirLock(str(tmp_path), stale_s=1, heartbeat_s=0.2).acquire()
    assert 1 <= time.monotonic() - start < 10
  finally:
    stop.set()
    thread.join()


def test_another_hosts_pid_is_not_looked_up_here(tmp_path):
  """A pid from another host says nothing about this host's processes: a lock whose pid is dead here
  but whose heartbeat is fresh is a live run there, waited for and then refused, not taken over."""
  dead = subprocess.run(
    [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True
  )
  # A heartbeat in the future stays fresh for the whole wait, with no thread to renew it.
  _write_holder(str(tmp_path), pid=int(dead.stdout), heartbeat=time.time() + 60, token="there")
  start = time.monotonic()
  with pytest.raises(ConfigError, match="in use by another run \\(host other-host"):
    workdir.WorkdirLock(str(tmp_path), stale_s=0.5, heartbeat_s=0.1).acquire()
  assert time.monotonic() - start >= 0.5  # waited for its heartbeat to stop first
  assert _holder(str(tmp_path))["token"] == "there"


def test_the_holder_keeps_its_heartbeat_fresh(tmp_path):
  lock = workdir.WorkdirLock(str(tmp_path), heartbeat_s=0.1)
  lock.acquire()
  try:
    time.sleep(0.5)
    assert _holder(str(tmp_path))["heartbeat"] > lock.me.started
  finally:
    lock.release()


def test_a_storage_error_skips_one_heartbeat_not_the_rest(tmp_path, monkeypatch, capsys):
  lock = workdir.WorkdirLock(str(tmp_path), heartbeat_s=0.1)
  lock.acquire()
  real_write, failures = storage.write_atomic, []

  def flaky_write(path, text):
    if not failures:
      failures.append(path)
      raise ConnectionError("the bucket hung up")
    real_write(path, text)

  monkeypatch.setattr(storage, "write_atomic", flaky_write)
  try:
    time.sleep(0.6)
    assert failures and _holder(str(tmp_path))["heartbeat"] > lock.me.started
    assert "could not renew the lock" in capsys.readouterr().err
  finally:
    monkeypatch.undo()
    lock.release()


def test_an_unwritable_workdir_is_named(tmp_path):
  (tmp_path / "a_file").write_text("x")
  with pytest.raises(ConfigError, match="cannot write there") as e:
    workdir.WorkdirLock(str(tmp_path / "a_file")).acquire()
  assert e.value.field == "--workdir"


RACER = """
import sys, time
from at_jax.errors import ConfigError
from at_jax.experiment import workdir
lock = workdir.WorkdirLock(sys.argv[1])
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # both start together, imports done
try:
  lock.acquire()
except ConfigError as e:
  print("refused", e)
  sys.exit(0)
print("holds", flush=True)
time.sleep(2)
lock.release()
"""


def _race(path: str, env: dict) -> list[str]:
  start = str(time.time() + 8)
  procs = [
    subprocess.Popen(
      [sys.executable, "-c", RACER, path, start],
      cwd=ROOT,
      env=subprocess_env(**env),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for _ in range(2)
  ]
  outs = [p.communicate(timeout=120) for p in procs]
  assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
  return sorted(out.split()[0] for out, _ in outs)


def test_two_processes_never_both_hold_a_workdir_on_disk(tmp_path):
  assert _race(str(tmp_path / "run"), {}) == ["holds", "refused"]


def test_two_processes_never_both_hold_a_workdir_in_a_bucket(gcs_bucket):
  bucket, env = gcs_bucket
  # Another host's run in a bucket is waited for (its heartbeat may stop), so this race's loser sees a
  # live lock from this host, refused at once; a real other host would wait STALE_S first.
  assert _race(f"{bucket}/locked", env) == ["holds", "refused"]
  assert not storage.exists(f"{bucket}/locked/{workdir.LOCK_FILE}")  # released


def test_identity_names_each_changed_field_and_records_an_override(tmp_path, tiny_config):
  path = str(tmp_path)
  c = tiny_config(steps=4, mode="distill")
  assert workdir.check(c, path) == {}  # a new workdir
  workdir.record(c, path, {}, resuming=False)
  c.transfer.loss_impl = "blockwise"  # how, not what: not part of the identity
  c.data.num_threads = 2
  assert workdir.check(c, path) == {}
  c.transfer.mode, c.optim.base_lr = "copy", 0.5
  with pytest.raises(
    ConfigError, match=r"2 changed: optim.base_lr: .* -> 0.5; transfer.mode: 'distill' -> 'copy'"
  ) as e:
    workdir.check(c, path)
  assert e.value.field == "optim.base_lr" and "--config.resume=override" in e.value.message
  c.resume = "override"
  changed = workdir.check(c, path)
  assert changed == {"optim.base_lr": [2e-3, 0.5], "transfer.mode": ["distill", "copy"]}
  workdir.record(c, path, changed, resuming=True)
  history = workdir.read_record(path)["history"]
  assert [h["event"] for h in history] == ["start", "override"]
  assert history[1]["changed"]["transfer.mode"] == ["distill", "copy"]
  c.resume = "auto"
  assert workdir.check(c, path) == {}  # the override is the run's identity now
  c.resume = "sometimes"
  with pytest.raises(ConfigError, match="'sometimes' is not one of"):
    workdir.check(c, path)


def test_another_seed_is_another_run(tmp_path, tiny_config):
  """The seed draws the initialization and the data order: a relaunch with another one is refused."""
  path = str(tmp_path)
  c = tiny_config(steps=4, mode="distill")
  workdir.record(c, path, {}, resuming=False)
  c.seed += 1
  with pytest.raises(ConfigError, match=r"1 changed: seed: ") as e:
    workdir.check(c, path)
  assert e.value.field == "seed"


def test_only_an_evaluation_may_change_what_it_evaluates_on(tmp_path, tiny_config):
  """`EVALUATION_MAY_CHANGE` (eval split, crop) is free for an evaluation of the checkpoint alone: a
  training relaunch that changes it continues another run, and is refused."""
  path = str(tmp_path)
  c = tiny_config(steps=4, mode="distill")
  workdir.record(c, path, {}, resuming=False)
  c.data.crop_pct, c.data.eval_split = 0.5, "elsewhere"
  with pytest.raises(ConfigError, match=r"2 changed: data.crop_pct: .* -> 0.5; data.eval_split"):
    workdir.check(c, path)
  assert workdir.check(c, path, evaluating=True) == {}


def test_a_run_without_transfer_is_not_defined_by_teacher_or_transfer_fields(tmp_path, tiny_config):
  """Scratch (transfer.mode "none") reads no teacher: a relaunch naming another one, or another
  distillation weight, is the same run, also against a record that kept those fields (older at_jax);
  turning the transfer on is not."""
  path = str(tmp_path)
  c = tiny_config(steps=4, mode="none")
  c.teacher.init = "/old/teacher"
  assert not any(k.startswith(("teacher.", "transfer.layers")) for k in workdir.identity(c))
  workdir.record(c, path, {}, resuming=False)
  c.teacher.init, c.transfer.weight = "/moved/teacher", 1.0
  assert workdir.check(c, path) == {}
  older = workdir.read_record(path)
  older["identity"].update({"teacher.init": "/old/teacher", "transfer.weight": 3.0})
  storage.write_atomic(os.path.join(path, workdir.IDENTITY_FILE), json.dumps(older))
  assert workdir.check(c, path) == {}
  c.transfer.mode = "distill"
  with pytest.raises(ConfigError, match=r"transfer.mode: 'none' -> 'distill'"):
    workdir.check(c, path)
  # A scratch student of the teacher's architecture (model.arch) reads the teacher: part of the run.
  mirrored = str(tmp_path / "mirrored")
  c = tiny_config(steps=4, mode="none")
  c.model.arch, c.teacher.init = "teacher", "/old/teacher"
  workdir.record(c, mirrored, {}, resuming=False)
  c.teacher.init = "/other/teacher"
  with pytest.raises(ConfigError, match=r"teacher.init: '/old/teacher' -> '/other/teacher'"):
    workdir.check(c, mirrored)


def test_a_teacher_of_another_recipe_is_named_under_its_prefix(tmp_path):
  from configs import demo  # pylint: disable=import-outside-toplevel

  c = demo.get_config()
  teacher_dir = str(tmp_path / "teacher")
  workdir.record(c.teacher.pretrain, teacher_dir, {}, resuming=False)
  c.unlock()
  c.teacher.pretrain.mae.mask_ratio = 0.5
  with pytest.raises(ConfigError) as e:
    workdir.check(c.teacher.pretrain, teacher_dir, prefix="teacher.pretrain.")
  assert e.value.field == "teacher.pretrain.mae.mask_ratio"
  assert "--config.teacher.pretrain.resume=override" in e.value.message
  # The student's own identity holds its teacher's: another teacher recipe is another run.
  assert workdir.identity(c)["teacher.pretrain.mae.mask_ratio"] == 0.5
  assert "teacher.pretrain.data.num_threads" not in workdir.identity(c)


def test_metrics_of_steps_after_the_resumed_one_are_dropped(tmp_path):
  writer = metrics.MetricWriter(str(tmp_path))
  for step in (2, 4, 6):
    writer.write(step, {"train/loss": float(step)})
  writer.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 8, "train/lo')  # the line a kill cut short
  resumed = metrics.MetricWriter(str(tmp_path), after_step=4)
  resumed.write(6, {"train/loss": 6.5})
  resumed.close()
  lines = metrics.read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert [(x["step"], x["train/loss"]) for x in lines] == [(2, 2.0), (4, 4.0), (6, 6.5)]
