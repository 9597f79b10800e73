"""Evaluation on datasets in the format of ../shared/data/README.md (dataset reader, recognition)."""
