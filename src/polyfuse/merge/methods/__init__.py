"""Weight-merge methods as pure per-tensor functions (docs/design.md, "Weight merging").

`MERGE_METHODS` imports every module of this package on its first lookup, so a new method registers itself
just by being a file in the package.
"""

from polyfuse.merge.methods.base import MERGE_METHODS, MergeMethod, TensorTask

__all__ = ["MERGE_METHODS", "MergeMethod", "TensorTask"]
