"""``python -m automl_diff.study``: the command line (:mod:`automl_diff.cli`) under the name the
README and the shipped studies use."""
