"""Evaluation and test fixtures, on top of the product (prism_otel, processors, receivers)."""
