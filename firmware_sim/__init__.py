"""fleetgate firmware simulator: simulated devices and fleets (built in a later issue)."""
