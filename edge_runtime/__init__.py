"""edge_runtime: built by its own issue; empty until then."""
