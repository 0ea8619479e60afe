"""Shared test support: real PostgreSQL, real processes, bounded waits."""
