"""Analysis tools: training-memory model and device profiles (and, beside them, loss landscapes)."""
