"""Corpus preparation and inspection tools behind `hpctrain prepare` / `hpctrain corpus`."""
