"""The database: where it comes from (DATABASE_URL or embedded), its migrations and the
repositories.

The only modules that import asyncpg; callers get typed results and `StoreUnavailable`.
"""
