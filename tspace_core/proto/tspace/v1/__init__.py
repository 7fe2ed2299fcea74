"""Generated protobuf and gRPC code, tspace_core.proto.tspace.v1; regenerate: python tools/gen_protos.py."""
