"""A real S3 API server on loopback for tests: moto's standalone server, in its own process."""

from __future__ import annotations

import os
import socket
import sys
import urllib.request
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, TestCase

from .daemon import wait_for


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Ended(ProcessProtocol):
    def __init__(self) -> None:
        self.ended: Deferred[None] = Deferred()

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)


class S3Server:
    """moto_server on a free loopback port; stopped when the test ends."""

    access_key, secret_key, region = "test-access-key", "test-secret-key", "us-east-1"

    def __init__(self, case: TestCase) -> None:
        self.case = case
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """What a client of this server needs in its environment."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": self.region}

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/moto-api/", timeout=2):
                return True
        except OSError:
            return False

    @inlineCallbacks
    def start(self) -> Any:
        try:
            import moto.server  # noqa: F401
        except ImportError:
            raise SkipTest("moto's server is not installed (./dev test installs moto[server])") from None
        protocol = _Ended()
        transport = reactor.spawnProcess(protocol, sys.executable,
                                         [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                                          str(self.port)],
                                         env={"PATH": os.environ.get("PATH", "")}, childFDs={0: "w", 1: "r",
                                                                                             2: "r"})

        def stop() -> Deferred[None]:
            if not protocol.ended.called:
                transport.signalProcess("KILL")
            return protocol.ended

        self.case.addCleanup(stop)
        yield wait_for(self._answers, "the S3 server to answer", timeout=60)
        return self

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.url, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name=self.region)
