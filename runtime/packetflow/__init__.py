"""PacketFlow: declared capabilities as running, observable, composable services."""

__version__ = "0.1.0"
