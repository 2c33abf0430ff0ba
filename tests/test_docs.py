"""Docs that cannot drift: the configuration reference against the config, every relative link and
anchor against the files and headings, every code name and path shown against the code, and every shell
command shown against what checks it."""

import importlib
import pathlib
import re
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from configs import common, demo, mae_fmnist

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = sorted(
  [
    ROOT / "README.md",
    ROOT / "CHANGELOG.md",
    *ROOT.glob("docs/*.md"),
    *ROOT.glob("projects/*/README.md"),
  ]
)
# Commands a test runs as shown (by what the command starts with), and the test that does.
RUN_BY_TESTS = {
  "bash launch/setup.sh": ".ci/run (CI runs the README's test command on a clean clone)",
  ".venv/bin/python -m pytest": ".ci/run",
  "python -m at_jax.convert": "tests/convert/test_main.py, tests/convert/test_export.py",
  "python examples/own_flax_model.py": "tests/test_examples.py",
  "python -m projects.": "tests/projects/ (their plans validated; chunks run by hand)",
  "python launch/precompute.py": "tests/experiment/test_precompute.py (precompute.run)",
  "python launch/evaluate.py": "tests/evaluate/test_evaluate_command.py",
  "python launch/attention_maps.py": "tests/evaluate/test_similarity.py",
  "python launch/teacher_heads.py": "tests/launch/test_teacher_heads.py",
  "git ": "(version control)",
  "pip install": "launch/setup.sh (CI)",
}
# The repository's top-level folders: a path shown that starts with one must exist.
TOPS = "at_jax|benchmarks|configs|launch|projects|tests|examples|docs"
NEEDS = re.compile(
  r"#\s*needs:"
)  # a command that needs what CI lacks says so: "# needs: ImageNet, a GPU"


def _fields(c, prefix: str = "") -> set[str]:
  out = set()
  for key, value in c.items():
    name = f"{prefix}{key}"
    out |= _fields(value, f"{name}.") if hasattr(value, "items") and key != "pretrain" else {name}
  return out


def test_every_config_field_is_documented_and_every_documented_field_exists():
  text = (ROOT / "docs" / "configuration.md").read_text()
  reference = text[text.index("## Every field") :]
  documented = set()
  for row in reference.splitlines():
    if row.startswith("| `"):
      documented |= set(re.findall(r"`([a-z_0-9]+(?:\.[a-z_0-9]+)?)`", row.split(" | ")[0]))
  config = _fields(common.base()) | _fields(demo.get_config()) | _fields(mae_fmnist.get_config())
  assert sorted(config - documented) == [], "fields missing from docs/configuration.md"
  assert sorted(documented - config) == [], "documented fields the config does not have"


def _slug(heading: str) -> str:
  """GitHub's anchor of a Markdown heading."""
  text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
  return text.replace(" ", "-")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_point_at_files_and_headings_that_exist(page):
  text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code is not linked
  broken = []
  for target in re.findall(r"\]\(([^)\s]+)\)", text):
    if target.startswith(("http://", "https://", "mailto:")):
      continue
    path, _, anchor = target.partition("#")
    file = (page.parent / path).resolve() if path else page
    if not file.exists():
      broken.append(target)
    elif anchor and file.suffix == ".md":
      headings = re.findall(r"^#+ (.+)$", file.read_text(), flags=re.M)
      if anchor not in {_slug(h) for h in headings}:
        broken.append(target)
  assert not broken, f"{page.relative_to(ROOT)}: links to nothing: {broken}"


def _commands(text: str) -> list[str]:
  """Shell commands of fenced bash blocks and of indented blocks, continuation lines joined."""
  blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
  blocks += ["\n".join(re.findall(r"^    ((?:python|bash) .*)$", text, flags=re.M))]
  commands = []
  for block in blocks:
    joined = re.sub(r"\\\n\s*", " ", block)
    commands += [c.strip() for c in joined.splitlines() if c.strip() and not c.startswith("#")]
  return commands


def _config_flags_parse(command: str, monkeypatch: pytest.MonkeyPatch) -> None:
  """The --config file and every --config.a.b=value of a launch/main.py command, parsed as the launcher
  parses them (ml_collections reads them from sys.argv as the flag is defined): a field the config
  lacks, or a value of the wrong type, fails here."""
  args = [a for a in command.split("#")[0].split() if a.startswith("--config")]
  argv = ["main", *[a.replace("configs/", str(ROOT / "configs") + "/", 1) for a in args]]
  repo_paths = [a.split("=", 1)[1] for a in args if "=" in a]
  missing = [v for v in repo_paths if re.match(rf"({TOPS})/", v) and not (ROOT / v).exists()]
  assert not missing, f"{command}: names repository paths that do not exist: {missing}"
  monkeypatch.setattr(sys, "argv", argv)
  values = flags.FlagValues()
  default = str(ROOT / "configs" / "demo.py")
  config_flags.DEFINE_config_file("config", default, flag_values=values, lock_config=True)
  values(argv)
  values.config.to_dict()


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_shown_is_checked_or_says_what_it_needs(page, monkeypatch):
  unchecked = []
  for command in _commands(page.read_text()):
    if NEEDS.search(command) or command.startswith(tuple(RUN_BY_TESTS)):
      continue
    if command.startswith(("python launch/main.py", ".venv/bin/python launch/main.py")):
      _config_flags_parse(
        command, monkeypatch
      )  # the demo itself is run end to end by tests/launch/test_main.py
      continue
    unchecked.append(command)
  assert not unchecked, (
    f"{page.relative_to(ROOT)}: commands no test runs or parses; add them to a test (RUN_BY_TESTS) "
    f"or end them with '# needs: <what CI lacks>': {unchecked}"
  )


def test_the_tests_said_to_run_the_commands_exist():
  """RUN_BY_TESTS names test files and folders that exist (two it named had moved)."""
  named = {
    path for says in RUN_BY_TESTS.values() for path in re.findall(r"\S+\.py|\S+/(?=[ ,]|$)", says)
  }
  assert named and sorted(p for p in named if not (ROOT / p).exists()) == []


def test_a_command_naming_a_field_the_config_lacks_fails_the_check(monkeypatch):
  """The check above can fail: the field the old README offered (and the config never had), and a
  path in the repository that is not there."""
  with pytest.raises(Exception, match="num_registers"):
    _config_flags_parse("python launch/main.py --config.model.num_registers=4", monkeypatch)
  with pytest.raises(AssertionError, match="projects/none"):
    _config_flags_parse("python launch/main.py --config.teacher.init=projects/none", monkeypatch)


def _resolves(dotted: str) -> bool:
  """Whether `a.b.c` is a module, or an attribute of the longest importable module prefix."""
  parts = dotted.split(".")
  for cut in range(len(parts), 0, -1):
    try:
      found = importlib.import_module(".".join(parts[:cut]))
    except ImportError:
      continue
    for name in parts[cut:]:
      if not hasattr(found, name):
        return False
      found = getattr(found, name)
    return True
  return False


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_code_names_and_paths_shown_exist(page):
  """Every `at_jax.x.y` shown in backticks imports (a module, or a name in one), and every repository
  path shown in backticks (`at_jax/transfer/pairing.py`, `benchmarks/gpu.sh`) is there."""
  text = page.read_text()
  missing = [n for n in re.findall(r"`(at_jax(?:\.\w+)+)`", text) if not _resolves(n)]
  for path in re.findall(rf"`((?:{TOPS})/[\w/.\-]*\w)/?`", text):
    if not (ROOT / path).exists():
      missing.append(path)
  assert not missing, f"{page.relative_to(ROOT)}: names or paths that do not exist: {missing}"
