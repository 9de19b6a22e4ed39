"""The agent's gRPC edge.

The servicer, the controller's client, wire conversion, mTLS and the generated wire types.
"""
