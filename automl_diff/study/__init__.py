"""The command line: ``python -m automl_diff.study {run,status,pareto,export,profile}``."""
