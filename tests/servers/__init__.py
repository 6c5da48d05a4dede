"""In-process servers that stand in for real services in tests."""
