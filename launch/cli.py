"""What every launcher shares: the --config/--workdir/multi-host flags, jax.distributed start-up, workdir."""

import importlib.util
import os
import sys
from collections.abc import Callable
from typing import Any

from absl import flags
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "demo.py")


def define_config_flag(help_text: str = "") -> None:
  """--config: a config file (get_config), fields overridable as --config.a.b=value; locked.

  ml_collections loads the file and applies the overrides right here, while the flag is defined: a
  missing, empty or broken file, or an override of a field that does not exist, ends the process with
  one line naming the file or the field (exit 2), not the chained tracebacks of the config library."""
  try:
    config_flags.DEFINE_config_file(
      "config",
      DEFAULT_CONFIG,
      help_text or "Config file (get_config); override fields with --config.a.b=value.",
      lock_config=True,
    )
  except Exception as e:  # anything the file or an override raises: said in one line
    print(f"Config error: {config_problem(e, sys.argv)}", file=sys.stderr)
    sys.exit(2)


def _config_path(argv: list[str]) -> str:
  """The --config file of `argv` (the default if none); a `:arg` suffix (get_config's argument) dropped."""
  path = DEFAULT_CONFIG
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      path = arg.split("=", 1)[1]
    elif arg == "--config" and i + 1 < len(argv):
      path = argv[i + 1]
  return path.split(":", 1)[0]


def config_problem(error: BaseException, argv: list[str]) -> str:
  """One line on why the --config file or an override of `argv` failed to load (`error`)."""
  path = _config_path(argv)
  chain = [error]
  while chain[-1].__cause__ or chain[-1].__context__:
    chain.append(chain[-1].__cause__ or chain[-1].__context__)
  syntax = [e for e in chain if isinstance(e, SyntaxError)]
  if syntax:
    return f"{path}, line {syntax[0].lineno}: {syntax[0].msg} (--config)"
  if not os.path.isfile(path):
    return f"{path}: no such config file (--config)"
  spec = importlib.util.spec_from_file_location("at_jax_config_check", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:
    return f"{path}: loading it raised {type(e).__name__}: {e} (--config)"
  if not callable(getattr(module, "get_config", None)):
    return (
      f"{path}: defines no get_config() (--config): a config file returns its ConfigDict from it"
    )
  try:
    config = module.get_config()
  except Exception as e:
    return f"{path}: get_config() raised {type(e).__name__}: {e} (--config)"
  for arg in argv:
    if arg.startswith("--config."):
      unknown = _unknown_field(config, arg[len("--config.") :].split("=", 1)[0])
      if unknown:
        return f"{arg}: {unknown}"
  return f"{path}: {type(error).__name__}: {error} (--config and its --config.* overrides)"


def _unknown_field(config: Any, dotted: str) -> str:
  """Why `dotted` names no field of `config` ("" if it does): the section that lacks it, and its fields."""
  node, seen = config, "config"
  for name in dotted.split("."):
    if not hasattr(node, "keys"):
      return f"{seen} is a value ({node!r}), not a section with field {name!r}"
    if name not in node:
      return f"{seen} has no field {name!r}; its fields: {sorted(node.keys())}"
    node, seen = node[name], f"{seen}.{name}"
  return ""


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

  def parse_flags(argv: list[str]) -> list[str]:
    try:
      rest = flags.FLAGS(argv)
      if "config" in flags.FLAGS:
        list(flags.FLAGS.config.keys())  # a file that failed to load raises here, not while parsing
      return rest
    except flags.Error:
      raise  # absl's own one-line report ("FATAL Flags parsing error: ...")
    except Exception as e:  # the --config file, loaded while its flag is parsed
      print(f"Config error: {config_problem(e, argv)}", file=sys.stderr)
      sys.exit(2)

  app.run(main_with_quiet_libraries, flags_parser=parse_flags)


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
    preemption.watch_peers()  # a process stopped before the loop stops the others too
  config_path = f["config"].config_filename
  name = os.path.splitext(os.path.basename(config_path))[0]
  if f["workdir"].present and not f.workdir.strip():
    # An empty --workdir= would otherwise mean the default, and might extend someone's run there.
    print(
      "Config error: --workdir is empty; name a folder (or drop the flag for workdir/<config>)",
      file=sys.stderr,
    )
    sys.exit(2)
  return config_path, f.workdir or os.path.join("workdir", name)
