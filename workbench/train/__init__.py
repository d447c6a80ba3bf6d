"""Training, one module per step, lowest first: ``config`` (``TrainConfig``), ``recipe`` (the
step budget, early stopping, optimiser, weight average, starting network), ``loop`` (the epoch
of optimiser steps and what ranks share), ``finish`` (calibrate, test, trust pieces, saliency
checks, bundle) and ``training`` (a run from start to end, and cross-validation)."""
