"""The sweep's config error, in its own module so that :mod:`regvi.sweep.config` and
:mod:`regvi.sweep.metric_names` both import it at module top without an import cycle
(re-exported as :class:`regvi.sweep.config.ConfigError`)."""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A sweep config problem; the message names the key and what was expected."""
