"""Sweeps: Ray Tune + Optuna over CLIP-ES prompt and refinement settings, every trial in MLflow."""
