"""Tests of the charger-side API models."""
