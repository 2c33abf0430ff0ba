"""What every launcher shares: the --config/--workdir/multi-host flags, jax.distributed start-up, workdir."""

import os
from collections.abc import Callable

from absl import flags
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "demo.py")


def define_config_flag(help_text: str = "") -> None:
  """--config: a config file (get_config), fields overridable as --config.a.b=value; locked."""
  config_flags.DEFINE_config_file(
    "config",
    DEFAULT_CONFIG,
    help_text or "Config file (get_config); override fields with --config.a.b=value.",
    lock_config=True,
  )


def define_flags(workdir_help: str) -> None:
  """--config, --workdir and the multi-host flags of launch/main.py and launch/precompute.py."""
  define_config_flag()
  flags.DEFINE_string("workdir", None, workdir_help)
  define_multihost_flags()


def define_multihost_flags() -> None:
  flags.DEFINE_bool(
    "multihost", False, "Call jax.distributed.initialize() (TPU pods, GPU clusters)."
  )
  flags.DEFINE_string("coordinator", None, "host:port of process 0 (GPU/CPU clusters).")
  flags.DEFINE_integer("num_processes", None, "Number of processes (GPU/CPU clusters).")
  flags.DEFINE_integer("process_id", None, "This process's index (GPU/CPU clusters).")


def run(main: Callable[[list[str]], None]) -> None:
  """`app.run(main)`, with libraries' absl logs from WARNING up unless --verbosity is given.

  app.run sets INFO when --verbosity is not given, and orbax logs about 40 INFO lines per checkpoint
  save, which bury our progress lines and tables (all printed, none logged). `--verbosity=0` brings
  them back.
  """
  from absl import app, logging

  def main_with_quiet_libraries(argv: list[str]) -> None:
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)
    main(argv)

  app.run(main_with_quiet_libraries)


def start() -> tuple[str, str]:
  """Joins the other processes under --multihost; returns (config path, workdir: default workdir/<config>)."""
  import jax

  from at_jax.experiment import preemption

  preemption.install()  # first: a SIGTERM from here on ends the process promptly (exit 143)
  f = flags.FLAGS
  if f.multihost:
    # CPU clusters (and tests over loopback) need a cross-process collectives backend; TPU/GPU ignore it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f.coordinator, f.num_processes, f.process_id)
  config_path = f["config"].config_filename
  name = os.path.splitext(os.path.basename(config_path))[0]
  return config_path, f.workdir or os.path.join("workdir", name)
