"""Evaluation: the consistency report, model comparison, test-retest consistency, JSON numbers."""
