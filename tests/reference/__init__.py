"""Independent references the tests hold blipmon to (no blipmon code inside)."""
