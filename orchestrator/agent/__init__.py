"""The node agent: standard library only, shipped to nodes."""
