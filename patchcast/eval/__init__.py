"""The offline evaluations: ``patchcast eval`` (the patch method's accuracy / communication trade-off)
and ``patchcast eval-region`` (server-driven region retransmission), on one numpy core.

Where things live:

* numpy core, shared by both: :mod:`~patchcast.eval.arrays` (array aliases),
  :mod:`~patchcast.eval.grid` (what a sweep varies; the η grid), :mod:`~patchcast.eval.frontier`
  (gate decisions, exact curves, Pareto frontiers, the paired bootstrap),
  :mod:`~patchcast.eval.points` (choosing and serialising operating points),
  :mod:`~patchcast.eval.csvio` (``points.csv``), :mod:`~patchcast.eval.bytes` (measured bytes),
  :mod:`~patchcast.eval.tables` (report cells and the paper's tables);
* the patch method: :mod:`~patchcast.eval.config`, :mod:`~patchcast.eval.cache`,
  :mod:`~patchcast.eval.passes` (torch), :mod:`~patchcast.eval.experts`,
  :mod:`~patchcast.eval.sweep`, :mod:`~patchcast.eval.summary`, :mod:`~patchcast.eval.report`
  (``report.md`` and ``--publish``), :mod:`~patchcast.eval.run` (:func:`run_eval`);
* the region mode: :mod:`~patchcast.eval.region_passes` (torch), :mod:`~patchcast.eval.region`
  (:func:`run_region_eval`), :mod:`~patchcast.eval.region_report`;
* figures of both: :mod:`~patchcast.eval.plots` (matplotlib is imported only there).

Torch and matplotlib are imported inside the functions that need them, so the numpy core imports fast.
"""

from __future__ import annotations

from patchcast.eval.config import EvalConfig
from patchcast.eval.region import RegionEvalConfig, RegionEvalResult, run_region_eval
from patchcast.eval.run import EvalResult, run_eval

__all__ = ["EvalConfig", "EvalResult", "RegionEvalConfig", "RegionEvalResult", "run_eval", "run_region_eval"]
