"""The kvstore wire contract: generated protobuf/gRPC code and the tensor codec."""
