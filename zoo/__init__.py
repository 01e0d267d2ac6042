"""pnc.zoo."""
