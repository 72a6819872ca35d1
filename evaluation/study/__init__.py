"""The low-data study (evaluation/experiment.sh): config, plan (the list of units), run, estimate, progress, report."""
