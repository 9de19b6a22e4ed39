"""Host networking, one module per kind of guest interface."""
