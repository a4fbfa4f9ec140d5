"""The gRPC decision server: :mod:`.service` (``DecisionServer``), :mod:`.pool`
(``DecisionServerPool``, one process per core) and :mod:`.unary_loop` (the fast unary path)."""
