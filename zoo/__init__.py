"""Weights hosting for mdeq-zoo: catalog, verified download and publishing (imports nothing from mdeq)."""
