"""The master's admin API and its client, nexusctl's transport.

- `server`: `AdminServer`, HTTP/1.1 with JSON bodies on a Unix socket, run
  in a thread of the master.
- `client`: `AdminClient`, used by nexusctl and the tests.
- `cli_support`: the click options and output helpers shared by every
  nexusctl verb that talks to the master.
- `paths` and `unix_socket`: where the socket is, and how it is created
  and handed over.
"""

from nexus.admin.client import AdminClient, AdminClientError
from nexus.admin.paths import default_socket_path, socket_path
from nexus.admin.server import AdminServer
from nexus.admin.unix_socket import AdminSocketError

__all__ = ["AdminClient", "AdminClientError", "AdminServer", "AdminSocketError", "default_socket_path", "socket_path"]
