"""One module per schema revision, oldest first (``schema.REVISIONS`` lists them)."""
