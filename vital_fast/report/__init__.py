"""Writing what a run shows: images, the grid, the HTML gallery, compare pages and metric files.

- :mod:`vital_fast.report.pngs`: tensors to PNG (``to_uint8``, ``save_png``, atomic writes), the
  transparency alpha map, the reference strip and the grid of a run folder.
- :mod:`vital_fast.report.gallery`: the run folder's ``index.html`` (``build_gallery``).
- :mod:`vital_fast.report.compare`: the comparison page of two runs of the same targets.
- :mod:`vital_fast.report.metrics_io`: ``metrics.json``/``.md``/``.csv`` of a run and the
  ``compare.*`` tables of several (the metrics themselves are computed in
  :mod:`vital_fast.evaluate.metrics`).

Both the CLI and :mod:`vital_fast.evaluate` use these; nothing here imports either. This
``__init__`` imports nothing, so that importing one submodule loads only what it needs.
"""
