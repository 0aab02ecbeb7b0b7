"""Evaluation and baselines: the paper's comparison, reproduced offline.

- :mod:`vital_fast.evaluate.baselines`: activation maximization (pixel space, Fourier/Lucid),
  MACO-style phase-only optimization and BatchNorm-statistics matching (DeepInversion), run in
  the same engine as VITAL (``visualize(..., method=...)``) with the same outputs.
- :mod:`vital_fast.evaluate.metrics`: accuracy by the model and by an independent judge, a
  Fréchet distance in the judge's penultimate features, sort-matching W2 at the matched layers,
  relative activation of channel targets, diversity across seeds; ``evaluate_run`` and
  ``compare_runs`` write ``metrics.json`` and tables into run folders.
"""

from vital_fast.evaluate.baselines import BASELINES, BaselineSettings, baseline_options, run_baseline

__all__ = ["BASELINES", "BaselineSettings", "baseline_options", "run_baseline"]
