"""fleetgate enrollment: the fleet CA and its certificate profiles, the device registry, attestation
and the EST enrollment service (the factory at the bottom of the package map)."""
