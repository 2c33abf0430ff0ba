"""`no_compiles`: a context in which any XLA compilation fails the test (start-up checks must come first)."""

import contextlib
import logging

import jax
import pytest


class _CompileLog(logging.Handler):
  """Collects jax's "Compiling ..." log lines (jax.log_compiles emits them at WARNING)."""

  def __init__(self):
    super().__init__()
    self.compiled: list[str] = []

  def emit(self, record: logging.LogRecord) -> None:
    message = record.getMessage()
    if message.startswith("Compiling"):
      self.compiled.append(message[:200])


@pytest.fixture
def no_compiles():
  """`with no_compiles() as compiled:` raises AssertionError at exit if anything was compiled inside.

  Caches are cleared on entry, so a computation compiled by an earlier test is compiled (and seen)
  again rather than served silently from the cache.
  """

  @contextlib.contextmanager
  def check():
    handler = _CompileLog()
    logger = logging.getLogger("jax")
    logger.addHandler(handler)
    jax.clear_caches()
    try:
      with jax.log_compiles():
        yield handler.compiled
    finally:
      logger.removeHandler(handler)
    assert not handler.compiled, f"compiled before the error: {handler.compiled}"

  return check
