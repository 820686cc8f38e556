"""Examples of bring-your-own models and data (importable as `examples.<module>`)."""
