"""Generated protobuf and gRPC code, tspace_core.proto.tspace; regenerate: python tools/gen_protos.py."""
