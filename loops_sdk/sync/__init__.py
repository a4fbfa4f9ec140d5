"""The client's sync machinery: :mod:`.transport` (shipper and policy watcher threads) and
:mod:`.spool` (the on-disk feedback spool). Loaded only when a client is given a learner."""
