"""Typed errors of the device SDK; each message says what to do next.

Every error the SDK raises on purpose derives from :class:`DeviceSdkError`, so an application can
catch the SDK's refusals apart from its own bugs.
"""

from __future__ import annotations


class DeviceSdkError(Exception):
    """Base of every error the device SDK raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class KeyStoreError(DeviceSdkError):
    """The key store is missing something the TLS layer needs, or holds an inconsistent identity."""


class CipherPolicyError(DeviceSdkError):
    """The TLS 1.3 cipher suites of the policy cannot be set on this Python/OpenSSL."""


class EnrollmentError(DeviceSdkError):
    """EST enrollment or renewal failed; the certificate on disk (if any) is unchanged."""


class NotConnected(DeviceSdkError):
    """The client has no MQTT session; ``last_error`` says why the last attempt failed."""

    def __init__(self, message: str, last_error: str | None = None) -> None:
        super().__init__(message if last_error is None else f"{message}: {last_error}")
        self.last_error = last_error


class QueueFull(DeviceSdkError):
    """The offline queue for QoS 1 messages is at its bound; the message was not queued."""

    def __init__(self, bound: int) -> None:
        super().__init__(
            f"the offline queue holds {bound} unacknowledged QoS 1 messages (its bound): "
            "wait for the broker to acknowledge some (DeviceClient.flush), drop or aggregate "
            "readings, or construct the client with a larger max_queued"
        )
        self.bound = bound


class PublishRefused(DeviceSdkError):
    """The broker acknowledged a QoS 1 PUBLISH with an error reason code (MQTT 5)."""

    def __init__(self, topic: str, reason: str, code: int) -> None:
        super().__init__(
            f"the broker refused the message on {topic!r}: {reason} (0x{code:02x}); "
            "a device may publish only under the topics its group's ACL allows"
        )
        self.topic = topic
        self.reason = reason
        self.code = code


class SubscribeRefused(DeviceSdkError):
    """The broker answered a SUBSCRIBE with a failure reason code."""

    def __init__(self, topic_filter: str, reason: str, code: int) -> None:
        super().__init__(
            f"the broker refused the subscription to {topic_filter!r}: {reason} (0x{code:02x}); "
            "a device may subscribe only to the filters its group's ACL allows"
        )
        self.topic_filter = topic_filter
        self.reason = reason
        self.code = code


class AckTimeout(DeviceSdkError, TimeoutError):
    """The broker did not acknowledge in time; a QoS 1 message stays queued and is resent."""


class ClientClosed(DeviceSdkError):
    """The client was closed before the operation completed."""
