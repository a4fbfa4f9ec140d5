"""Network plumbing shared by clients and servers: :mod:`.channel` (client channels),
:mod:`.auth` (server TLS and tokens), :mod:`.devcerts` (local certificates), :mod:`.server`
(the one gRPC server set-up). Imports grpc; never loaded by ``import loops_sdk``."""
