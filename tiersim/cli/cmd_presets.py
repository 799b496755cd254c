"""Placeholder until the simulator presets land: `tiersim presets`."""
