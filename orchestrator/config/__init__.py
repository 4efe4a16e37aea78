"""Reading and validating a job's config: the seed's training YAML plus an optional ``launch:`` section.

Everything here is pure (it reads the config file and checks paths exist, nothing more) and
reports every problem at once in a :class:`ConfigError`.
"""
from .errors import ConfigError
from .load import JobConfig, load_config

__all__ = ["ConfigError", "JobConfig", "load_config"]
