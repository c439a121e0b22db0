"""pytest plugin: fixtures port_lease and free_port (being written)."""
