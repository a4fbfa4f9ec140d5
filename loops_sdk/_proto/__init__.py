# GENERATED — DO NOT EDIT. Run `python proto/generate.py` to regenerate from proto/.
"""Generated protobuf and gRPC modules for the loops.v1 wire contracts."""
