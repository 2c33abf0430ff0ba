"""One run per workdir: a lock that keeps two launches apart, and an identity that keeps a relaunch the
same run.

The lock, <workdir>/run.lock, is taken by process 0 for every process of a job before anything is
written into the workdir, and held until the job ends (teacher, student, exports; the teacher's workdir
inside it is locked too while the teacher trains). Taking it is one exclusive create (O_EXCL on disk,
an upload conditional on no object in a bucket), so of two launches exactly one wins; the other stops
with one line naming the holder (host, pid, start time). The holder rewrites its heartbeat every
`HEARTBEAT_S`; a lock is stale, and taken over without a person, when its process is gone (same host)
or its heartbeat is older than `STALE_S` (any host: a launch on another host waits that long before
refusing). A takeover is itself one exclusive create, of a marker named after the stale lock's token,
so two launches cannot both take over.

The identity, <workdir>/run.json, is what defines the run: every field of `IDENTITY_SECTIONS` except
those of `NOT_IDENTITY` and those the run does not read (a run without transfer, `_unused`),
written at the run's first start with a history of its launches. A relaunch with any of them changed is
refused, naming each, before anything is computed, unless the config says `resume="override"`, which is
recorded in the history.
"""

import contextlib
import dataclasses
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections

from at_jax import storage
from at_jax.errors import ConfigError
from at_jax.experiment import preemption

LOCK_FILE = "run.lock"
IDENTITY_FILE = "run.json"
HEARTBEAT_S = 15.0
STALE_S = 90.0
RESUME_MODES = ("auto", "override")

# The config sections that say what a run computes: its data, model, teacher, transfer, objective and
# schedule. Changing any of them mid-run would continue one run's checkpoint as another run.
IDENTITY_SECTIONS = (
  "seed",
  "task",
  "model",
  "teacher",
  "transfer",
  "data",
  "optim",
  "schedule",
  "mae",
)
# ... except these fields, which say how it is computed or logged, not what: a relaunch may change them.
NOT_IDENTITY = {
  "model.attention_impl": "fused and materialised attention compute the same function",
  "model.remat_policy": "recomputation changes memory, not values",
  "transfer.loss_impl": "the three losses compute the same values",
  "transfer.loss_block": "a tile size",
  "data.num_threads": "input threads",
  "data.eval_batch_size": "evaluation batches sum to the same figures",
  "data.file_list_dir": "a cache",
  "schedule.log_every_steps": "logging",
}
# ... and these, which an evaluation of a run's checkpoint may change too: what it is evaluated on, and how
# it is viewed (`loop.evaluate_checkpoint`); the model, its teacher and its transfer must be the run's.
EVALUATION_MAY_CHANGE = ("data.dir", "data.eval_split", "data.eval_labels", "data.crop_pct")
_HOST = socket.gethostname()


# ---------------------------------------------------------------------------------------------------------
# the lock


@dataclasses.dataclass(frozen=True)
class Holder:
  """Who holds a workdir's lock, as its file says."""

  host: str
  pid: int
  started: float
  heartbeat: float
  token: str
  command: str

  def describe(self, now: float) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
    return (
      f"host {self.host}, pid {self.pid}, started {started}, heartbeat {now - self.heartbeat:.0f} s "
      f"ago: {self.command}"
    )


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    return True
  return True


class WorkdirLock:
  """<workdir>/run.lock (see the module docstring). `acquire` raises ConfigError("--workdir") naming the
  holder, or the reason the workdir cannot be written."""

  def __init__(self, workdir: str, *, stale_s: float = STALE_S, heartbeat_s: float = HEARTBEAT_S):
    self.workdir, self.stale_s, self.heartbeat_s = workdir, stale_s, heartbeat_s
    self.path = os.path.join(workdir, LOCK_FILE)
    now = time.time()
    self.me = Holder(_HOST, os.getpid(), now, now, uuid.uuid4().hex, " ".join(sys.argv)[:300])
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._markers: list[str] = []  # takeover markers this launch made: kept until it releases

  def acquire(self) -> None:
    deadline = time.time() + self.stale_s + self.heartbeat_s
    waiting_said = False
    while True:
      if self._create(self.path, self.me):
        self._thread = threading.Thread(target=self._beat, name="at_jax-lock", daemon=True)
        self._thread.start()
        return
      holder, now = self._read(), time.time()
      if holder is None:  # released meanwhile, or still being written: look again
        time.sleep(0.2)
        continue
      if self._stale(holder, now):
        self._take_over(holder, now)
        continue
      if holder.host == _HOST or now > deadline:
        raise ConfigError(
          "--workdir",
          f"{self.workdir} is in use by another run ({holder.describe(now)}); wait for it to end, "
          f"or use another --workdir. A crashed run's lock ({self.path}) is taken over by itself once "
          f"its process is gone (same host) or its heartbeat is {self.stale_s:.0f} s old",
        )
      if not waiting_said:
        print(
          f"{self.workdir} is locked by {holder.describe(now)}; waiting up to "
          f"{deadline - now:.0f} s for its heartbeat to stop (a crashed run on another host)",
          flush=True,
        )
        waiting_said = True
      time.sleep(min(self.heartbeat_s, max(0.1, deadline - now)))

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5)
    holder = self._read()
    if holder is not None and holder.token == self.me.token:
      storage.remove(self.path)
    for marker in self._markers:
      storage.remove(marker)

  def _create(self, path: str, holder: Holder) -> bool:
    try:
      return storage.create_exclusive(path, json.dumps(dataclasses.asdict(holder)))
    except OSError as e:  # a file where the folder should be, no permission, a read-only disk
      raise ConfigError("--workdir", f"{self.workdir}: cannot write there ({e})") from None

  def _read(self) -> Holder | None:
    try:
      with storage.open_file(self.path) as f:
        return Holder(**json.loads(f.read()))
    except FileNotFoundError:
      return None
    except (ValueError, TypeError):  # created, content not yet written (disk), or not our file
      mtime = storage.mtime_ns(self.path)
      if mtime is not None and time.time() - mtime / 1e9 > self.stale_s:
        return Holder("?", 0, 0.0, mtime / 1e9, "unreadable", f"an unreadable {self.path}")
      return None

  def _stale(self, holder: Holder, now: float) -> bool:
    gone = holder.host == _HOST and not _alive(holder.pid)
    return gone or now - holder.heartbeat > self.stale_s

  def _take_over(self, stale: Holder, now: float) -> None:
    """Removes a stale lock, once: the launch that creates the stale lock's takeover marker does it.
    The marker stays while that launch holds the workdir, so a slower launch that read the same stale
    lock cannot make it again and remove the new lock; the lock is re-read before it is removed."""
    marker = f"{self.path}.{stale.token}.takeover"
    if self._create(marker, self.me):
      self._markers.append(marker)
      current = self._read()
      if current is not None and current.token == stale.token:
        print(f"Taking over the stale lock of {self.workdir} ({stale.describe(now)})", flush=True)
        storage.remove(self.path)
    else:
      time.sleep(0.2)  # another launch is taking it over: the next look sees its lock

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      try:
        holder = self._read()
        if holder is None or holder.token != self.me.token:
          print(
            f"WARNING: lost the lock of {self.workdir} to {holder}", file=sys.stderr, flush=True
          )
          return
        beat = dataclasses.replace(self.me, heartbeat=time.time())
        storage.write_atomic(self.path, json.dumps(dataclasses.asdict(beat)))
      except Exception as e:  # pylint: disable=broad-exception-caught
        # A storage error (a bucket's, after its client's retries) must not end the heartbeat: the
        # lock would go stale while the run goes on, and another launch would take the workdir.
        print(
          f"WARNING: could not renew the lock of {self.workdir} ({type(e).__name__}: {e}); "
          f"trying again in {self.heartbeat_s:g} s",
          file=sys.stderr,
          flush=True,
        )


_held: set[str] = set()  # the workdirs this process holds (process 0) or its job holds (the others)
_claims = 0  # counts claims, to name each one's agreement among processes


@contextlib.contextmanager
def claimed(workdir: str) -> Iterator[None]:
  """Holds <workdir>'s lock for the block: process 0 takes it, every process learns the outcome (and
  raises the same ConfigError if it failed). Re-entrant for the same workdir. A workdir inside a held
  one (<workdir>/teacher) takes its own lock too: a launch straight into it would otherwise train
  there beside the job."""
  global _claims
  path = storage.absolute(workdir).rstrip("/")
  if path in _held:
    yield
    return
  lock = WorkdirLock(path) if jax.process_index() == 0 else None
  error = None
  if lock is not None:
    try:
      lock.acquire()
    except ConfigError as e:
      error = e
  if jax.process_count() > 1:
    _claims += 1
    error = _agree(f"at_jax/workdir_claim/{_claims}", error)
  if error is not None:
    raise error
  _held.add(path)
  if lock is not None:
    preemption.before_exit(lock.release)  # an early SIGTERM leaves no lock behind
  try:
    yield
  finally:
    _held.discard(path)
    if lock is not None:
      preemption.cancel_before_exit(lock.release)
      lock.release()


def _agree(key: str, error: ConfigError | None) -> ConfigError | None:
  """Process 0's outcome for every process, through the coordination service's key-value store."""
  client, _ = preemption.coordination_client()
  if jax.process_index() == 0:
    client.key_value_set(key, json.dumps(None if error is None else [error.field, error.message]))
    return error
  outcome = json.loads(client.blocking_key_value_get(key, 10 * 60 * 1000))
  return None if outcome is None else ConfigError(*outcome)


# ---------------------------------------------------------------------------------------------------------
# the identity


def identity(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The flat {dotted field: value} that defines the run (see the module docstring); a teacher trained
  in the run (teacher.pretrain) is defined by its own identity, nested under its prefix."""
  fields = config.to_dict()
  flat: dict[str, Any] = {}

  def walk(value: Any, field: str) -> None:
    if field in NOT_IDENTITY or _unused(config, field):
      return
    if field == "teacher.pretrain" and value is not None:
      flat.update({f"{field}.{k}": v for k, v in identity(config.teacher.pretrain).items()})
    elif isinstance(value, dict):
      for name, item in value.items():
        walk(item, f"{field}.{name}")
    else:
      flat[field] = json.loads(json.dumps(value, default=list))  # tuples as the file holds them

  for section in IDENTITY_SECTIONS:
    if section in fields:
      walk(fields[section], section)
  return flat


def _unused(config: ml_collections.ConfigDict, field: str) -> bool:
  """Whether `field` computes nothing in this config: a run without transfer (transfer.mode "none")
  reads no other transfer field, and no teacher unless its architecture is the teacher's
  (`model.arch` "teacher" or "teacher_components", read from `teacher.*`)."""
  if config.get("transfer", {}).get("mode", "none") != "none":
    return False
  if field.startswith("transfer."):
    return field != "transfer.mode"
  mirrors_teacher = config.get("model", {}).get("arch", "own") != "own"
  return field.startswith("teacher.") and not mirrors_teacher


def read_record(workdir: str) -> dict[str, Any] | None:
  path = os.path.join(workdir, IDENTITY_FILE)
  if not storage.exists(path):
    return None
  with storage.open_file(path) as f:
    return json.load(f)


def check(
  config: ml_collections.ConfigDict, workdir: str, prefix: str = "", evaluating: bool = False
) -> dict[str, list]:
  """{field: [recorded, now]} of the identity fields this launch changes against <workdir>/run.json
  ({} without one); raises ConfigError naming each unless `resume="override"`. `prefix`: where `config`
  sits in the launched one (``teacher.pretrain.`` for its teacher), to name the fields in full.
  `evaluating`: an evaluation of the run's checkpoint, which may change `EVALUATION_MAY_CHANGE`."""
  resume = config.get("resume", "auto")
  if resume not in RESUME_MODES:
    raise ConfigError(f"{prefix}resume", f"{resume!r} is not one of {RESUME_MODES}")
  record = read_record(workdir)
  if record is None:
    return {}
  before, now = record["identity"], identity(config)
  # A field the record lacks came with a newer at_jax than the run's start: not a change of the run;
  # nor is one this config does not use (recorded by an older at_jax, which kept them).
  changed = {
    k: [before.get(k, "(absent)"), now.get(k, "(absent)")]
    for k in sorted(before)
    if before[k] != now.get(k, "(absent)") and not _unused(config, k)
    if not (evaluating and k in EVALUATION_MAY_CHANGE)
  }
  if changed and resume != "override":
    listed = "; ".join(f"{prefix}{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
    todo = (
      "Evaluate it with its settings (the overrides it was launched with), or pass "
      f"--config.{prefix}resume=override to evaluate its checkpoint as these settings would"
      if evaluating
      else f"Relaunch with its settings, use a new --workdir, or pass --config.{prefix}resume=override "
      "to continue it with these"
    )
    raise ConfigError(
      f"{prefix}{next(iter(changed))}",
      f"{workdir} holds a run started with other settings ({len(changed)} changed: {listed}). "
      f"{todo} (recorded in {os.path.join(workdir, IDENTITY_FILE)})",
    )
  return changed


def record(
  config: ml_collections.ConfigDict, workdir: str, changed: dict[str, list], resuming: bool
) -> None:
  """Writes <workdir>/run.json (process 0): the identity of this launch and one more history entry,
  "start", "resume", "override" (with the changed fields) or "adopted" (a run from before run.json)."""
  if jax.process_index() != 0:
    return
  previous = read_record(workdir)
  event = "override" if changed else "resume" if previous else "adopted" if resuming else "start"
  entry = {"event": event, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": _HOST}
  entry["pid"], entry["command"] = os.getpid(), " ".join(sys.argv)[:300]
  if changed:
    entry["changed"] = changed
  history = (previous or {}).get("history", []) + [entry]
  content = {"identity": identity(config), "history": history}
  storage.write_atomic(os.path.join(workdir, IDENTITY_FILE), json.dumps(content, indent=1))
