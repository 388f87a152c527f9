"""Conformance: the validator, test vectors and the harness for other implementations."""
