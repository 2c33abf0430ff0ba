"""train_and_evaluate(config, workdir): the training loop, its evaluation, resume and preemption.

No model math here: the steps come from the run's task (at_jax.training).
"""

import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
from jax.experimental import multihost_utils

from at_jax import checkpoint, metrics, sharding
from at_jax.data import options, pipeline
from at_jax.errors import ConfigError
from at_jax.experiment import build, preemption, profiling, stream, validation
from at_jax.experiment import workdir as workdir_claim
from at_jax.experiment.paths import CHECKPOINT_DIR, EMA_EXPORT_DIR, EXPORT_DIR
from at_jax.experiment.preemption import Preempted
from at_jax.experiment.runs import Run, setup
from at_jax.experiment.teachers import init_from_pretrained, load_vit, teacher_path
from at_jax.training import state as train_state
from at_jax.transfer import spec as transfer_spec

# In each checkpoint's extra: the running best of the evaluations up to its step (metrics.update_best), and
# the step of the last of them (a run preempted at an evaluation step saves before evaluating it).
BEST_KEY = "best_evals"
LAST_EVAL_KEY = "last_eval_step"


def evaluate_run(run: Run, eval_fn, state: train_state.TrainState) -> dict[str, float]:
  """The eval step's sums over the whole eval split, divided by the example count.

  Classification: top1/top5 (%) for raw and EMA params; MAE: reconstruction loss / ema_loss.
  """
  d = run.config.data
  it = pipeline.eval_iterator(
    run.eval_source,
    global_batch_size=d.eval_batch_size,
    **options.eval_view(d),
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    num_threads=d.num_threads,
  )
  totals: dict[str, float] = {}
  skipped = 0
  for batch in it:
    skipped += int(batch.pop("skipped").sum())  # unreadable records, already masked out of the sums
    sums = eval_fn(
      state.params, state.ema_params, sharding.global_batch(batch, run.mesh), run.teacher_params
    )
    for k, v in jax.device_get(sums).items():
      totals[k] = totals.get(k, 0.0) + float(v)
  count = totals.pop("count")
  if skipped:
    print(
      f"WARNING: {skipped} unreadable eval examples skipped (this process); the figures leave them out",
      flush=True,
    )
  return {k: v / count for k, v in sorted(totals.items())}


class Evaluations:
  """A run's evaluations: each logged (eval/<name>) with the running best so far (eval/best_<name>,
  eval/best_<name>_step), which every checkpoint carries, so that a relaunch reports exactly the best an
  uninterrupted run does. The best lives in the checkpoint, not in metrics.jsonl: the log of a killed run
  may hold lines past its last checkpoint, which the relaunch writes again."""

  def __init__(self, run: Run, eval_fn: Any, saved: Mapping[str, Any]):
    """`saved`: the extra of the checkpoint the run starts from ({} for a fresh run)."""
    self.run, self.eval_fn = run, eval_fn
    self.steps = run.eval_steps()
    self.best: dict[str, float] = dict(saved.get(BEST_KEY, {}))
    self.last_step = int(saved.get(LAST_EVAL_KEY, 0))
    start = int(saved.get("step", 0))
    if start and BEST_KEY not in saved and any(step <= start for step in self.steps):
      print(
        f"WARNING: the checkpoint at step {start} predates recording the best evaluation: the "
        f"best_* figures cover the evaluations from step {start} on",
        flush=True,
      )

  def due(self, step: int) -> bool:
    """Whether `step` is an evaluation step before the last that has not been evaluated yet."""
    return step in self.steps and step > self.last_step

  def __call__(
    self, step: int, state: train_state.TrainState, writer: metrics.MetricWriter
  ) -> dict[str, float]:
    """Evaluates `state` (at `step`), updates the best, logs both; returns the evaluation."""
    evals = evaluate_run(self.run, self.eval_fn, state)
    self.best = metrics.update_best(self.best, step, evals)
    self.last_step = step
    writer.write(step, {f"eval/{k}": v for k, v in {**evals, **self.best}.items()})
    return evals

  def extra(self) -> dict[str, Any]:
    """What a checkpoint saved now records of the evaluations."""
    return {BEST_KEY: self.best, LAST_EVAL_KEY: self.last_step}


def _checkpointer(run: Run) -> checkpoint.Checkpointer:
  return checkpoint.Checkpointer(
    os.path.join(run.workdir, CHECKPOINT_DIR),
    save_every=run.config.ckpt.every_steps,
    keep=run.config.ckpt.keep,
  )


def _fresh_state_and_steps(run: Run):
  """A fresh sharded state, the jitted train step of each step number (`step -> fn`: after a
  `transfer.until` switch the label-only step, a second program compiled when first called) and the
  jitted eval step."""
  state, shardings = train_state.create_sharded_state(
    run.init_fn, jax.random.key(run.config.seed), run.mesh
  )
  teacher = run.teacher_params
  teacher_shardings = None if teacher is None else jax.tree.map(lambda a: a.sharding, teacher)
  jit = lambda fn: train_state.jit_steps(fn, run.eval_fn, run.mesh, shardings, teacher_shardings)
  train_fn, eval_fn = jit(run.step_fn)
  label_fn = jit(run.label_step_fn)[0] if run.label_step_fn else train_fn
  switch = run.task.switch_step
  return state, shardings, lambda step: train_fn if step <= switch else label_fn, eval_fn


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, validated: validation.Validated | None = None
) -> dict[str, float]:
  """Trains (resuming from <workdir>/checkpoints), evaluates, exports params; returns evals. `validated`:
  `validation.validate(config, workdir)`, when the caller has it (a config is checked once).

  Holds the workdir's lock throughout, and refuses a relaunch that would continue another run
  (at_jax.experiment.workdir) or relabel its checkpoints (a schedule shorter than the saved step)."""
  with workdir_claim.claimed(workdir):
    run = setup(config, workdir, validated=validated)
    changed = workdir_claim.check(config, workdir)
    ckpt = _checkpointer(run)
    saved_step = ckpt.latest_step()
    if saved_step is not None and saved_step > run.total_steps:
      raise ConfigError(
        "schedule.steps",
        f"this run ends at step {run.total_steps}, but {ckpt.directory} holds step {saved_step}: "
        f"a shorter schedule would relabel that state and let ckpt.keep delete it. Set "
        f"schedule.steps >= {saved_step} (or the epochs that give it), or use a new --workdir",
      )
    workdir_claim.record(config, workdir, changed, resuming=saved_step is not None)
    metrics.say(run.memory)  # validation has refused a config that cannot fit, before compiling
    return _train_and_evaluate(run, ckpt)


def _train_and_evaluate(run: Run, ckpt: checkpoint.Checkpointer) -> dict[str, float]:
  config, workdir = run.config, run.workdir
  state, shardings, train_fn_at, eval_fn = _fresh_state_and_steps(run)
  state, saved = _starting_state(run, state, shardings, ckpt)
  start = int(jax.device_get(state.step))
  evaluations = Evaluations(run, eval_fn, saved)
  # Lines a killed run logged past its last checkpoint are logged again from there: drop them first.
  # A step evaluated again drops its eval line too: a finished run's last, or one saved before its
  # evaluation (preempted there), evaluated by a relaunch that was then killed before its next save.
  evaluates_start_again = start == run.total_steps or evaluations.due(start)
  writer = metrics.MetricWriter(workdir, after_step=start, evals_at_step=evaluates_start_again)
  _describe(run, start)
  # One SIGTERM/SIGINT policy from the first step to the export: in the loop every process saves the
  # same step and stops; after it, the final save, evaluation and export complete first.
  with preemption.training() as sigterm:
    with profiling.step_trace(config.profile, workdir) as trace:
      # A checkpoint of an older format has no count: absent, it starts from 0.
      skipped_before = int(saved.get("skipped_examples", 0))
      state, skipped_total = _train(
        run, state, start, skipped_before, train_fn_at, evaluations, ckpt, writer, sigterm, trace
      )
    extra = {**stream.position(run, run.total_steps, skipped_total), **evaluations.extra()}
    ckpt.save(run.total_steps, state, extra=extra, force=True)
    ckpt.wait()
    # Not in the final checkpoint's best: a relaunch of a finished run evaluates its last step again.
    evals = evaluations(run.total_steps, state, writer)
    writer.close()
    ckpt.close()
    _export(run, state)
  results = {**evals, **evaluations.best}
  metrics.say(metrics.evals_table(results, run.total_steps))
  if sigterm.requested:
    raise Preempted(
      f"stopped after finishing: the signal came after the last step, so the final checkpoint, "
      f"evaluation and export of {workdir} completed first; the run is complete"
    )
  return results


def _export(run: Run, state: train_state.TrainState) -> None:
  """Exports the EMA params, then the raw ones: <workdir>/params marks a finished run (job.py does not
  train a teacher whose export is there), so it comes last."""
  for directory, params in ((EMA_EXPORT_DIR, state.ema_params), (EXPORT_DIR, state.params)):
    # Params may be sharded across processes: every process gathers the full values before the export.
    export_config, export_params = run.export(multihost_utils.process_allgather(params, tiled=True))
    copies = teacher_path(run.config, run.workdir) if run.transfer.mode == "copy" else ""
    checkpoint.save_params(
      os.path.join(run.workdir, directory), export_params, export_config, copies_attention_of=copies
    )


def _starting_state(
  run: Run, state: train_state.TrainState, shardings: Any, ckpt: checkpoint.Checkpointer
) -> tuple[train_state.TrainState, dict[str, Any]]:
  """(the state to start from, the extra of its checkpoint: data position, evaluations; {} if none).

  Resume order: the workdir's checkpoint, then `model.init` (fine-tuning), then the fresh state.
  """
  config = run.config
  if ckpt.latest_step() is not None:
    state, extra = ckpt.restore(state)
    stream.check_position(run, extra)
    print(f"Resumed from {run.workdir}/checkpoints at step {int(state.step)}", flush=True)
    return state, extra
  if config.model.init:
    _, loaded = load_vit(config.model.init, config)
    params, kept, unused = init_from_pretrained(
      jax.device_get(state.params), loaded, run.model.scan
    )
    state = jax.jit(lambda p, r: train_state.new_state(p, run.tx, r), out_shardings=shardings)(
      params, state.rng
    )
    print(
      f"Initialised from {config.model.init}; kept fresh: {kept or 'none'}; unused: {unused or 'none'}",
      flush=True,
    )
  return state, {}


def _train(
  run: Run,
  state: train_state.TrainState,
  start: int,
  skipped_before: int,
  train_fn_at: Callable[[int], Any],
  evaluations: Evaluations,
  ckpt: checkpoint.Checkpointer,
  writer: metrics.MetricWriter,
  sigterm: preemption.Training,
  trace: profiling.StepTrace,
) -> tuple[train_state.TrainState, int]:
  """Steps `start + 1 .. total_steps`: logs, checkpoints, evaluates; returns (state, skipped total).

  Metrics of step t are fetched after step t+1 is dispatched, so the host never waits on the device.
  Raises Preempted (after saving, the same step on every process) on a SIGTERM to any process.
  """
  config, s = run.config, run.config.schedule
  name = f"train[{run.phase(start + 1)}]"
  progress = metrics.Progress(
    name, run.total_steps, start=start, unit_per_step=config.data.batch_size
  )
  batches = stream.train_batches(run, start)
  pending = None  # (step, metrics) of the step before, fetched after the next one is dispatched
  skipped = 0  # this process's examples that stood in for unreadable ones, since (re)start
  skipped_total = skipped_before  # the run's count over all processes, as of the last sum
  if evaluations.due(start):  # preempted at an evaluation step: it saved before evaluating
    evaluations(start, state, writer)
  preempted = False
  for step in range(start + 1, run.total_steps + 1):
    batch = next(batches)
    skipped += int(batch.pop("skipped").sum())  # a host-side count, not an input of the step
    if step == run.task.switch_step + 1 and run.label_step_fn:
      metrics.say(f"step {step}: the distillation ends (transfer.until); labels alone from here")
    trace.before(step)
    state, step_metrics = train_fn_at(step)(
      state, sharding.global_batch(batch, run.mesh), run.teacher_params
    )
    trace.after(step, state)
    if pending is not None:
      _log(run, pending, writer, progress, ckpt)
    pending = None
    log_now = step % s.log_every_steps == 0 or step == run.total_steps
    preempted = sigterm.stop_at(step)  # the same answer on every process
    if log_now or preempted or step % config.ckpt.every_steps == 0 or jax.process_count() == 1:
      # Summed over processes where it is logged or may be saved: every process reaches those steps
      # together, so the gather lines up; on other steps no save happens and the stale value is unused.
      skipped_total = skipped_before + sharding.process_sum(skipped)
    if log_now:
      pending = (step, {**step_metrics, "skipped_examples": skipped_total})
    if evaluations.due(step) and not preempted:
      # Before the save, so that the checkpoint's best includes it; a preempted run saves at once.
      evaluations(step, state, writer)
    if preempted or step % config.ckpt.every_steps == 0:
      _before_save(run, step, step_metrics, pending, writer, progress, ckpt)
      pending = None
    extra = {**stream.position(run, step, skipped_total), **evaluations.extra()}
    ckpt.save(step, state, extra=extra, force=preempted)
    if preempted:
      break
  if pending is not None:  # also when preempted: the relaunch starts after this step
    _log(run, pending, writer, progress, ckpt)
  if preempted:
    _stop_preempted(step, ckpt, writer)
  return state, skipped_total


def _before_save(
  run: Run,
  step: int,
  step_metrics: Any,
  pending: tuple[int, Any] | None,
  writer: metrics.MetricWriter,
  progress: metrics.Progress,
  ckpt: checkpoint.Checkpointer,
) -> None:
  """Before the save of `step`: its train line (`pending`) is written now, since a run killed after
  the save resumes past the step and would never log it again; a diverged state is never saved
  (`_check_finite`, which `_log` runs too)."""
  if pending is not None:
    _log(run, pending, writer, progress, ckpt)
  else:
    _check_finite(step, jax.device_get(step_metrics), ckpt)


def _stop_preempted(step: int, ckpt: checkpoint.Checkpointer, writer: metrics.MetricWriter) -> None:
  """Lets the save of `step` finish, closes the run's files and raises Preempted."""
  ckpt.wait()
  ckpt.close()
  writer.close()
  raise Preempted(
    f"preempted at step {step}: checkpoint saved in {ckpt.directory}; relaunch with the "
    "same workdir to resume exactly"
  )


def evaluate_checkpoint(
  config: ml_collections.ConfigDict, workdir: str, step: int | None = None
) -> dict[str, float]:
  """Evaluates <workdir>/checkpoints at `step` (default: the latest) exactly as training evaluated it.

  Raises ConfigError naming each field `config` changes against the run's record (<workdir>/run.json),
  but its eval data and view (`workdir.EVALUATION_MAY_CHANGE`): a copy run evaluated as a distill
  run would score its student without the teacher it attends with.
  """
  workdir_claim.check(config, workdir, evaluating=True)
  run = setup(config, workdir, check_targets=False)  # evaluation reads no stored teacher targets
  state, _, _, eval_fn = _fresh_state_and_steps(run)
  ckpt = _checkpointer(run)
  state, _ = ckpt.restore(state, step)
  ckpt.close()
  return evaluate_run(run, eval_fn, state)


def _log(run: Run, pending, writer: metrics.MetricWriter, progress: metrics.Progress, ckpt) -> None:
  step, device_metrics = pending
  values = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
  _check_finite(step, values, ckpt)
  writer.write(step, {f"train/{k}": v for k, v in values.items()})
  phase = run.phase(step)  # after a switch the label step's distill_loss is a placeholder 0
  shown = ("loss", "distill_loss", "train_acc") if phase == "distill" else ("loss", "train_acc")
  progress.update(step, {k: values[k] for k in shown if k in values}, name=f"train[{phase}]")


def _check_finite(step: int, values: dict[str, Any], ckpt: checkpoint.Checkpointer) -> None:
  """FloatingPointError if step `step`'s loss or gradient norm is not finite, naming the newest
  committed checkpoint.

  Checked on every log step and before every save: a diverged state saved unnoticed until the next
  log step could rotate the good checkpoints away (keep-N). A finite loss of step t means finite
  params before it, a finite gradient norm finite params after it. At a save the fetch costs no
  stall: the save waits on step t's state anyway.
  """
  bad = {k: float(values[k]) for k in ("loss", "grad_norm") if k in values}
  bad = {k: v for k, v in bad.items() if not math.isfinite(v)}
  if not bad:
    return
  ckpt.wait()  # a save still in flight is committed before the message names it
  last = ckpt.latest_step()
  kept = (
    f"the last good checkpoint (step {last}) is intact in {ckpt.directory}"
    if last is not None
    else f"no checkpoint was saved before it (ckpt.every_steps={ckpt.save_every})"
  )
  what = ", ".join(f"{k} {v}" for k, v in bad.items())
  raise FloatingPointError(f"non-finite {what} at step {step}; {kept}")


def _describe(run: Run, start: int) -> None:
  m, spec = run.model, run.transfer
  what = f" | {transfer_spec.describe(spec)}" if spec.active else ""
  if run.task.switch_step:
    what += f" (steps 1-{run.task.switch_step}, then labels alone)"
  warmup = build.warmup_steps(run.config, len(run.train_source))
  if warmup >= run.total_steps:  # only with schedule.steps: given in epochs it is refused
    what += f" | warm-up cut from {warmup} to {run.total_steps - 1} steps (schedule.steps)"
  metrics.say(
    f"ViT width {m.width} depth {m.depth} heads {m.num_heads} patch {m.patch_size}{what} | "
    f"{run.total_steps} steps of {run.config.data.batch_size} on mesh {dict(run.mesh.shape)}"
    + (f" | resuming at {start}" if start else "")
  )
