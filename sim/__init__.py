"""Synthetic fleet simulator and real-trace replay into Kafka."""
