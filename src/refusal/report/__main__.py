"""``python -m refusal.report DIR``: write the sweep report of a multirun folder."""

from refusal.report.tables import main

raise SystemExit(main())
