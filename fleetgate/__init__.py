"""fleetgate's shared base: configuration, errors, identifiers, topic syntax, TLS servers, key files
and process helpers that every component uses. Imports nothing of the product (fleetgate.cli,
the admin command line, sits on top of everything instead)."""
