"""Deprecated: split into :mod:`loops_sdk.net.channel` (client channels),
:mod:`loops_sdk.net.auth` (server authentication) and :mod:`loops_sdk.net.devcerts`
(development certificates). This alias goes in the next release."""

from . import _moved
from .net.auth import *  # noqa: F401,F403
from .net.auth import __all__ as _auth_all
from .net.auth import _RANK, _bearer, _denying_handler, _digest, _service_of  # noqa: F401
from .net.channel import *  # noqa: F401,F403
from .net.channel import __all__ as _channel_all
from .net.channel import _CallDetails, _MetadataInterceptor  # noqa: F401
from .net.channel import read_pem as _read  # noqa: F401
from .net.devcerts import *  # noqa: F401,F403
from .net.devcerts import __all__ as _devcerts_all
from .net.devcerts import _write_new  # noqa: F401

__all__ = sorted(set(_auth_all) | set(_channel_all) | set(_devcerts_all))

_moved.warn("loops_sdk.security is deprecated and will be removed in the next release; "
            "import loops_sdk.net.channel, loops_sdk.net.auth or loops_sdk.net.devcerts")
