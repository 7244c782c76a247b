"""thermal package."""
