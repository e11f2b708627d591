"""guardray."""
