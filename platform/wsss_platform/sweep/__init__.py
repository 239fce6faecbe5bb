"""Sweeps: Ray Tune + Optuna over a job's settings (labeling: CAM source, prompts, refiners, masks), every trial in MLflow."""
