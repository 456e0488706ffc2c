"""trio_vhost: a vhost-user backend library on trio.

Layers, lowest first (imports only point downward; a test enforces it):

* :mod:`trio_vhost.proto` -- sans-IO protocol: bytes and fds in, typed requests out;
* :mod:`trio_vhost.mem` -- guest memory regions and tables (mmap + numpy);
* :mod:`trio_vhost.vring` -- split virtqueues, device side and driver side;
* ``trio_vhost._io`` -- the trio transport (SCM_RIGHTS) and eventfds;
* :class:`Device`, the worker, the session and :func:`serve`;
* :class:`Frontend`, a Python frontend + virtio driver for tests and tools.
"""

from .device import Completion as Completion
from .device import Device as Device
from .device import QueueContext as QueueContext
from .errors import ClientExit as ClientExit
from .errors import ConnectionClosed as ConnectionClosed
from .errors import DeviceError as DeviceError
from .errors import Disconnect as Disconnect
from .errors import GuestMemoryError as GuestMemoryError
from .errors import LocalProtocolError as LocalProtocolError
from .errors import ProtocolError as ProtocolError
from .errors import RemoteProtocolError as RemoteProtocolError
from .errors import UnsupportedRequest as UnsupportedRequest
from .errors import VhostUserError as VhostUserError
from .errors import VirtqueueError as VirtqueueError
from .frontend import DriverVring as DriverVring
from .frontend import Frontend as Frontend
from .frontend import RequestNacked as RequestNacked
from .frontend import VringFailed as VringFailed
from .mem.guest import GuestRam as GuestRam
from .mem.table import MemoryTable as MemoryTable
from .proto.constants import FrontendReq as FrontendReq
from .proto.constants import ProtocolFeature as ProtocolFeature
from .proto.constants import VirtioFeature as VirtioFeature
from .server import serve as serve
from .server import serve_client as serve_client
from .server import serve_connection as serve_connection
from .server import serve_socket as serve_socket
from .vring.chain import DescriptorChain as DescriptorChain
from .vring.driver import DriverQueue as DriverQueue

__all__ = [
    "ClientExit",
    "Completion",
    "ConnectionClosed",
    "DescriptorChain",
    "Device",
    "DeviceError",
    "Disconnect",
    "DriverQueue",
    "DriverVring",
    "Frontend",
    "FrontendReq",
    "GuestMemoryError",
    "GuestRam",
    "LocalProtocolError",
    "MemoryTable",
    "ProtocolError",
    "ProtocolFeature",
    "QueueContext",
    "RemoteProtocolError",
    "RequestNacked",
    "UnsupportedRequest",
    "VhostUserError",
    "VirtioFeature",
    "VirtqueueError",
    "VringFailed",
    "serve",
    "serve_client",
    "serve_connection",
    "serve_socket",
]
