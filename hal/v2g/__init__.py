"""Bidirectional (V2G) power stages."""
