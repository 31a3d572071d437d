"""Device-agnostic timing, kernel-group classification and device health (see timing.py)."""
