"""kvstore gRPC server."""
