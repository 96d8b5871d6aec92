"""Evaluation: the paper's metrics (jitted), scoring a predictor on a split, and the report files."""
