"""Generated gRPC code of the agent API; regenerate with hack/gen-proto.sh."""
