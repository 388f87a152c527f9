"""pytest plugin of the conformance suite (see docs/porting.md)."""
