"""The built-in demo scene: a synthetic, deterministic town in 8-band imagery."""
