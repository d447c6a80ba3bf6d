"""Training: the configuration, the loop, the recipe and the finish (calibration, trust,
curves)."""
