"""``python -m regvi.sweep CONFIG``: Ray Train trials searched by Ray Tune, tracked in MLflow."""

from regvi.sweep.config import ConfigError, SweepConfig, load_config, parse_config

__all__ = ["ConfigError", "SweepConfig", "load_config", "parse_config"]
