"""Training losses as pure functions of tensors: the SFT token loss and the preference objectives.

Every module of this package is imported here, so a new objective registers itself in `OBJECTIVES`
just by being a file in the package.
"""

import importlib
import pkgutil

from polyfuse.objectives.base import OBJECTIVES, PreferenceBatch, PreferenceObjective, reward_metrics
from polyfuse.objectives.dpo import DPO, LengthNormalizedDPO, dpo_loss
from polyfuse.objectives.logps import IGNORE_INDEX, sequence_logps, sft_token_loss

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "DPO",
    "IGNORE_INDEX",
    "OBJECTIVES",
    "LengthNormalizedDPO",
    "PreferenceBatch",
    "PreferenceObjective",
    "dpo_loss",
    "reward_metrics",
    "sequence_logps",
    "sft_token_loss",
]
