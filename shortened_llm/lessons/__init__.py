"""The lessons layer: what only the notebooks, their solutions and the course apps use.

The package's core (one floor below) is the method alone: families, units, criteria, the
pipeline, recovery, evaluation, efficiency, export. Here sit the helpers that make it a course:

- ``explore``: the criterion x ratio and depth-vs-width explorers and their widgets (01, 02, 07);
- ``depth_vs_width``: depth- and width-pruned models of one size, side by side (07);
- ``claims``: the paper's claims checked against a run's tables (06, 09);
- ``grids``: notebook 09's recovery grid, one per preset;
- ``recovery_table``: notebook 09's rows: one recovery method at an equal budget, trained or loaded, evaluated;
- ``unit_comparison``: block vs attention-only vs MLP-only pruning at equal parameters (09);
- ``plots``: the figures every notebook draws.

Lessons import the core; the core never imports a lesson (``tests/test_architecture.py``).
"""
