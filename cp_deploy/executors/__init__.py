"""Executors drive the pipeline over a folder: the local one streams through threads."""
