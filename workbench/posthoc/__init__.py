"""Post-hoc models fitted after training: calibration, conformal prediction sets, out-of-
distribution detection, similar cases."""
