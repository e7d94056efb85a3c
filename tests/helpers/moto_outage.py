"""An S3 server that a test can stop and start again, to play an outage.

The session's ``s3`` fixture (conftest.py) cannot be stopped, since other tests share it; this is
a moto server of the test's own, on a fixed port so that clients reconnect to the same endpoint.
"""

from __future__ import annotations

import socket


class Outage:
    """Our own moto server on a fixed port, to stop and start again (moto's state is in-process,
    so the objects survive a restart)."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        self._cls = ThreadedMotoServer
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.server = None
        self.start()

    @property
    def endpoint(self) -> str:
        """The server's URL (``http://127.0.0.1:<port>``), the same across restarts."""
        return f"http://127.0.0.1:{self.port}"

    def start(self):
        """Start the server (again); a no-op while it runs."""
        if self.server is None:
            self.server = self._cls(ip_address="127.0.0.1", port=self.port, verbose=False)
            self.server.start()

    def stop(self):
        """Stop the server; its objects are kept for the next :meth:`start`."""
        if self.server is not None:
            self.server.stop()
            self.server = None
