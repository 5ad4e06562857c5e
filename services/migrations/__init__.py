"""Alembic migrations of newsmon's one database (every service's tables).

``newsmon migrate`` applies them, and so does every service at start-up; a PostgreSQL advisory
lock keeps processes that start together from migrating at once.
"""
