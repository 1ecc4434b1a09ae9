"""adalayers: side tasks on a frozen transformer."""
