"""Metrics and harnesses over the results of forgetcore's methods (``evaluation.unlearning``)."""
