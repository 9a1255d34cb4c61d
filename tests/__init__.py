"""fedshop tests."""
