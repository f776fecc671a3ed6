"""Fixture trees in the exact on-disk layouts of the benchmark datasets (see reference/DATASETS.md §9)."""
