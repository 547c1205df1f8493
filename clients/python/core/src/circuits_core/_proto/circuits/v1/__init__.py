"""Generated protobuf stubs; regenerate with scripts/gen_protos.py."""
