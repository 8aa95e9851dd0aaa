"""The object transformer (queries that read pixels and write back) and object summarizer."""
