"""Weight-merge methods as pure per-tensor functions (spec: docs of section "Weight merging").

Every module of this package is imported here, so a new method registers itself in `MERGE_METHODS` just by
being a file in the package.
"""

import importlib
import pkgutil

from polyfuse.merge.methods.base import MERGE_METHODS, MergeMethod, TensorTask

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["MERGE_METHODS", "MergeMethod", "TensorTask"]
