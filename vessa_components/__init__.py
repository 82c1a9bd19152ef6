"""Components of the VESSA MONAI bundles: data layouts, transforms, networks, engines, handlers and metrics."""

__version__ = "0.1.0"

from . import bundle, data, engines, handlers, metrics, networks, reporting, transforms, utils

__all__ = ["bundle", "data", "engines", "handlers", "metrics", "networks", "reporting", "transforms", "utils"]
