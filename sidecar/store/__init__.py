"""Stores: the embedded in-memory default and PostgreSQL on asyncpg."""
