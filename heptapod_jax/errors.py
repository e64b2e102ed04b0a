"""Errors shared across the package."""


class ConfigError(ValueError):
  """A config value is invalid. The message names the field and allowed values."""
