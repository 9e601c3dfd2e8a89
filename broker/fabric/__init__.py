"""The fabric between broker nodes (issue 12): NATS subjects for MQTT topics, and a node that
routes its clients' messages through a NATS cluster. Nothing here is imported unless [fabric] is
configured."""
