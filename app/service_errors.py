"""Errors of the local services and their helpers, with what to do about them."""

from __future__ import annotations

INSTALL_HINTS = {
    "java": "Java 17+ runs the Kafka broker: apt-get install openjdk-17-jre-headless",
    "mvn": "Maven resolves the Kafka jars from Maven Central (once): apt-get install maven",
    "redis-server": "Redis runs from the system package: apt-get install redis-server",
    "redis-cli": "redis-cli joins a local Redis Cluster: apt-get install redis-tools",
    "openssl": "openssl makes the local CA and certificates for TLS: apt-get install openssl",
}


class ServiceError(RuntimeError):
    """A service could not be started or stopped; the message says what to do."""


class MissingTool(ServiceError):
    """A program we need is not on PATH."""

    def __init__(self, tool: str) -> None:
        self.tool = tool
        super().__init__(f"`{tool}` not found on PATH. {INSTALL_HINTS.get(tool, '')}".strip())
