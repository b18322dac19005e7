"""The command line: ``python -m automl_diff.study {run,status,pareto,trials,report,dashboard,export,profile}``
(also ``python -m automl_diff.cli``, and the ``automl-diff`` script).

:mod:`~automl_diff.cli.app` parses the arguments and turns a user error into one line and exit
status 2; :mod:`~automl_diff.cli.commands` holds one function per subcommand.
"""

from __future__ import annotations

from automl_diff.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
