"""Generated protobuf and gRPC code, tspace_core.proto; regenerate: python tools/gen_protos.py."""
