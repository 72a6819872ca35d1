"""evaluate.sh's Python side: its config and command line, the real/synthetic mixes, the pipeline and its report."""
