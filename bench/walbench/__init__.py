"""Modules of bench/rpo (walship vs Litestream). The entry point is bench/rpo."""
