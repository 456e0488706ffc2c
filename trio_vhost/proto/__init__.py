"""Sans-IO vhost-user protocol: bytes and fds in, typed requests out.

Nothing in this package performs I/O or imports trio. The transport (``trio_vhost._io``)
frames bytes off a socket; :class:`BackendProtocol` validates and decodes them.
"""
