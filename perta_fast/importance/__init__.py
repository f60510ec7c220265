"""Parameter importance on the forget and retain sets, in three rooms:

- estimators: |mean gradient| ("grad") and the exact diagonal empirical Fisher ("fisher") of a loaded model on
  rows (hooks on each layer's input and output gradient; no per-sample gradient of the whole model is formed);
- budget: parameter groups and where the fp32 accumulators live under --max-memory;
- run: the importance file (options, resume, spill, torchrun, publish) and its in-memory twin.

Options: perta_fast.options.ImportanceOptions. The names users import are all here.
"""
from ..options import ImportanceOptions  # noqa: F401
from .budget import HOST_HEADROOM, accumulator_budget, parameter_groups, place_accumulators  # noqa: F401
from .estimators import METHODS, estimate_importance  # noqa: F401
from .run import compute_importance, importance_file, save_importance  # noqa: F401
