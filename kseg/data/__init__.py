"""Data sources, preparation, targets and datasets."""
