"""A stand-in for the services the real Azure SDKs talk to, on the wire (see service.py)."""
