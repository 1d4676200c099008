"""The gRPC edge: servicers, status mapping, and the server with health and reflection."""
