"""The study behind docs/RESULTS.md (``python bench/study.py``), one job a module:

- ``plan``: the models, steps, sweeps and control runs (Hydra overrides);
- ``run``: the runner (each step an ordinary command, skipped when its output exists);
- ``progress``: ``--plan``, each run's state and the time left by the study's own record;
- ``runs``: a study folder read back as report rows with per-prompt outcomes;
- ``verdict``: the claims' written rules (paired intervals, margins fixed in advance);
- ``verdict_sections``, ``sections``, ``peers``: the RESULTS sections (those that decide claims, the rest,
  the Pareto search beside the peers');
- ``plots``: the tunability plot, the length curve, the fronts;
- ``render``: docs/RESULTS.md from it all; ``cli``: the arguments.

Study code, not the framework's: nothing in ``src/refusal`` imports it. ``bench/`` must be on ``sys.path``
(``bench/study.py`` puts it there).
"""
