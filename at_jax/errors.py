"""The one error type users see for bad input: it names the config field or file to fix."""


class ConfigError(ValueError):
  """Bad configuration or input, detected before any compute is spent.

  Attributes:
    field: the config field (e.g. ``"transfer.layers"``) or file path to fix.
  """

  def __init__(self, field: str, message: str):
    super().__init__(f"{field}: {message}")
    self.field = field
