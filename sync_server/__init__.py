"""sync_server: built by its own issue; empty until then."""
