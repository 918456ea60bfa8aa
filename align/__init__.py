"""Sweetspot library: pure math and shared model/data code (no Ray, no DeepSpeed)."""
