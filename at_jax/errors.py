"""The one error type users see for bad input: it names the config field or file to fix."""

import re

_CONFIG_FIELD = re.compile(r"[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)*")


class ConfigError(ValueError):
  """Bad configuration or input, detected before any compute is spent.

  Attributes:
    field: the config field (e.g. ``"transfer.layers"``, in full: ``"teacher.pretrain.mae.mask_ratio"``
      for the config of a teacher pre-trained in the run) or the file path or flag to fix.
    message: what is wrong and how to fix it.
  """

  def __init__(self, field: str, message: str):
    super().__init__(f"{field}: {message}")
    self.field, self.message = field, message

  @property
  def flag(self) -> str:
    """The command-line form of a config field (``--config.transfer.layers``); "" for a file or flag."""
    return f"--config.{self.field}" if _CONFIG_FIELD.fullmatch(self.field) else ""

  def under(self, prefix: str) -> "ConfigError":
    """This error as raised for the config nested at `prefix` (e.g. ``teacher.pretrain``): a config
    field is named in full; a file path stays as it is."""
    if not self.flag:
      return self
    return ConfigError(f"{prefix}.{self.field}", self.message)

  def line(self) -> str:
    """One line for the user: the field, its flag form, and the message."""
    return f"{self.field} ({self.flag}): {self.message}" if self.flag else str(self)
