"""Alembic revisions of the registry schema; ``enrollment.registry.schema`` runs them."""
