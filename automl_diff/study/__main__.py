from __future__ import annotations

from automl_diff.cli import main

raise SystemExit(main())
