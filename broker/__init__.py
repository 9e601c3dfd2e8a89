"""fleetgate broker: the mTLS MQTT broker (built in a later issue)."""
