"""Trace harvesting: real LLM generation with forced-answer probes, features and token costs."""
