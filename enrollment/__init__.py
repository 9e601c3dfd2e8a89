"""fleetgate enrollment: the fleet CA, the device registry, EST enrollment and the admin CLI."""

from enrollment.config import Config, load_config
from enrollment.errors import FleetgateError
from enrollment.ids import validate_id

__all__ = ["Config", "FleetgateError", "load_config", "validate_id"]
