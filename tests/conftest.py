"""Fixtures shared by every test package live in each package's conftest; helpers in tests/support.py."""
