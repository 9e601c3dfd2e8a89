"""fleetgate device SDK: enrollment over EST now; the MQTT client comes with the broker issue."""

from device_sdk.est import EstClient, EstError, client_context, device_csr

__all__ = ["EstClient", "EstError", "client_context", "device_csr"]
