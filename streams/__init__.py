"""The streaming path: message schema and decoding, DLQ, window store, scorer, sinks."""
