"""Database engine, session factory, declarative base and unit of work."""
