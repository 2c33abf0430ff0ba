"""The house rules, checked: sizes, the import layering, shape-suffix letters, optional dependencies,
and the formatter and linter over every Python file."""

import ast
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from at_jax import models

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "at_jax"
BENCHMARKS = ROOT / "benchmarks"  # scripts, not a package: only the size rule applies
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
# A module or function may be longer when its docstring says why, in these words.
LONGER_BECAUSE = "longer than"

# Lowest first. A module may import modules of a strictly lower layer, or of its own package; siblings
# in one layer stay independent. `models` and `data` never see training or the experiment wiring.
LAYERS = (
  ("errors",),
  ("sharding", "storage"),
  ("checkpoint", "optim", "metrics"),
  ("ops",),
  ("models", "data"),
  ("convert", "transfer"),
  ("evaluate",),
  ("training",),
  ("experiment",),
)
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}


def _modules() -> list[pathlib.Path]:
  return sorted(PACKAGE.rglob("*.py"))


def _top(path: pathlib.Path) -> str:
  """The first-level part of at_jax a file belongs to: 'models', 'sharding', ..."""
  parts = path.relative_to(PACKAGE).with_suffix("").parts
  return parts[0]


def _code_lines(node: ast.AST) -> int:
  """Lines of a def or module, without its docstring."""
  lines = node.end_lineno - node.lineno + 1 if hasattr(node, "lineno") else 0
  body = node.body
  if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
    lines -= body[0].end_lineno - body[0].lineno + 1
  return lines


def _explains(node: ast.AST) -> bool:
  return LONGER_BECAUSE in (ast.get_docstring(node) or "")


def test_modules_and_functions_are_small():
  """The library's modules and the benchmark scripts beside it (benchmarks/*.py) alike."""
  too_long = []
  for path in _modules() + sorted(BENCHMARKS.glob("*.py")):
    tree = ast.parse(path.read_text())
    rel = path.relative_to(ROOT)
    lines = len(path.read_text().splitlines())
    if lines > MAX_MODULE_LINES and not _explains(tree):
      too_long.append(f"{rel}: {lines} lines")
    for node in ast.walk(tree):
      if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        n = _code_lines(node)
        if n > MAX_FUNCTION_LINES and not _explains(node):
          too_long.append(f"{rel}:{node.lineno} {node.name}: {n} lines")
  assert not too_long, (
    f"over {MAX_MODULE_LINES} lines a module / {MAX_FUNCTION_LINES} a function, and the docstring "
    f"does not say why it must be ('{LONGER_BECAUSE} ...'); split a module by job into modules "
    f"beside it (as benchmarks/input_pipeline.py and its pipeline_*.py), a function into "
    f"helpers:\n" + "\n".join(too_long)
  )


def _imported_parts(tree: ast.AST) -> set[str]:
  parts = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("at_jax"):
      names = node.module.split(".")
      if len(names) > 1:
        parts.add(names[1])
      else:  # from at_jax import sharding, ...
        parts.update(alias.name for alias in node.names)
    elif isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.startswith("at_jax."):
          parts.add(alias.name.split(".")[1])
  return parts


def test_imports_only_go_down_the_layers():
  wrong = []
  for path in _modules():
    if path.name == "__init__.py" and path.parent == PACKAGE:
      continue
    top = _top(path)
    assert top in LAYER_OF, f"{path.relative_to(ROOT)}: add '{top}' to LAYERS"
    for part in _imported_parts(ast.parse(path.read_text())):
      if part != top and LAYER_OF[part] >= LAYER_OF[top]:
        wrong.append(f"{path.relative_to(ROOT)} imports at_jax.{part}")
  assert not wrong, "imports that go up or sideways in LAYERS:\n" + "\n".join(wrong)


def _imported_modules(tree: ast.AST) -> set[str]:
  """Every module a file imports, at any depth (imports inside functions too), dotted."""
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and not node.level:
      found.add(node.module)
      found.update(f"{node.module}.{alias.name}" for alias in node.names)
    elif isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
  return found


def test_the_library_never_imports_studies_or_launchers_and_projects_stand_alone():
  """at_jax never imports configs/, projects/ or launch/ (recipes, studies and scripts use the library,
  not the reverse); a project never imports another project (each can be read, run and removed alone)."""
  wrong = []
  for path in _modules():
    tops = {name.split(".")[0] for name in _imported_modules(ast.parse(path.read_text()))}
    wrong += [
      f"{path.relative_to(ROOT)} imports {t}" for t in sorted(tops & {"projects", "launch"})
    ]
  for path in sorted((ROOT / "projects").rglob("*.py")):
    own = path.relative_to(ROOT / "projects").parts[0]
    for name in _imported_modules(ast.parse(path.read_text())):
      parts = name.split(".")
      if parts[0] == "projects" and len(parts) > 1 and parts[1] != own:
        wrong.append(f"{path.relative_to(ROOT)} imports {name}")
  assert not wrong, "\n".join(wrong)


def test_test_modules_share_set_ups_through_helpers_not_each_other():
  """A test module never imports another test module (its privates change with it): what several
  share lives in a conftest.py fixture or a helper module (tests/training/steps.py, ...)."""
  wrong = []
  for path in sorted((ROOT / "tests").rglob("test_*.py")):
    for name in _imported_modules(ast.parse(path.read_text())):
      if name.startswith("tests.") and any(p.startswith("test_") for p in name.split(".")[1:]):
        wrong.append(f"{path.relative_to(ROOT)} imports {name}")
  assert not wrong, "\n".join(wrong)


def test_shape_suffixes_use_the_defined_letters():
  """Names like x_BND in models/, ops/ and transfer/ use only the letters of at_jax.models.SHAPE_LETTERS."""
  letters = set(models.SHAPE_LETTERS)
  suffixed = re.compile(r"\b[a-z][a-z0-9]*(?:_[a-z0-9]+)*_([A-Z][A-Za-z0-9]*)\b")
  wrong = []
  for sub in ("models", "ops", "transfer"):
    for path in sorted((PACKAGE / sub).rglob("*.py")):
      for number, line in enumerate(path.read_text().splitlines(), 1):
        for suffix in suffixed.findall(line):
          if not set(suffix) <= letters:
            wrong.append(f"{path.relative_to(ROOT)}:{number}: _{suffix}")
  assert not wrong, f"suffix letters outside {sorted(letters)}:\n" + "\n".join(wrong)


def test_core_imports_without_the_input_and_experiment_dependencies():
  """A GPU image with jax, flax, optax and orbax but no grain, ml_collections, tensorboardX or tfds."""
  missing = ("grain", "ml_collections", "tensorboardX", "tensorflow_datasets")
  core = [
    "at_jax." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts)
    for p in _modules()
    if _top(p) in ("models", "ops", "transfer", "training", "sharding", "optim", "metrics")
    and p.name != "__init__.py"
  ]
  code = (
    f"import sys\nfor m in {missing!r}: sys.modules[m] = None\n"
    + "".join(f"import {m}\n" for m in core)
    + "print('ok')"
  )
  result = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
  )
  assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


@pytest.mark.parametrize("command", [["format", "--check"], ["check"]])
def test_formatter_and_linter_pass(command):
  ruff = shutil.which("ruff", path=str(pathlib.Path(sys.executable).parent)) or shutil.which("ruff")
  assert ruff, "ruff is in requirements-test.txt; run launch/setup.sh --tests"
  result = subprocess.run([ruff, *command, str(ROOT)], capture_output=True, text=True)
  assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
