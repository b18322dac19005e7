from __future__ import annotations

from automl_diff.study.cli import main

raise SystemExit(main())
