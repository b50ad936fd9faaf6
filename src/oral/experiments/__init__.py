"""Experiments: generated adapters against baselines, on seen and unseen base versions and tasks.

- `compare`: one base, the zoo's trained adapter vs adapters generated from held-out descriptions
  (`oral compare`).
- `runner`: the named experiments (`oral experiment NAME --config configs/exp-NAME.yaml`): every
  method of `methods` on every (version, task), cached and written in one long format.
"""

from oral.experiments.compare import (
    CompareConfig,
    ExperimentError,
    compare,
    final_checkpoints,
    format_compare,
    save_result,
)

__all__ = ["CompareConfig", "ExperimentError", "compare", "final_checkpoints", "format_compare", "save_result"]
