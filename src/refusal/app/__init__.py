"""The top of the graph: start-up of the Hydra entry points (``evaluate.py``, ``train.py``: logging, seeds,
friendly errors, checks of the command line before Hydra runs), the Hydra callbacks of a multirun and
``train.py``'s body, and SIGINT/SIGTERM as Ctrl-C for the bench drivers (``signals``). Nothing below imports it."""
