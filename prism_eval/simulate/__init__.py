"""Anomaly simulation toolkit: synthetic engine step streams, injected anomalies and their labels."""
