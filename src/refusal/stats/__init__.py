"""Statistics shared by the evaluation, the sweep report and the verdict (see :mod:`refusal.stats.paired`)."""
