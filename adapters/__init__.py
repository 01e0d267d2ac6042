"""pnc.adapters."""
