"""pnc.surgery."""
