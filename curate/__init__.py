"""Data curation by retrieval from an uncurated pool (embed, dedup, retrieve, balance)."""
