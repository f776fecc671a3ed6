"""Tiny encoder and model fixtures."""
