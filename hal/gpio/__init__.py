"""gpio package."""
