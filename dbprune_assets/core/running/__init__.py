"""Running: the home lock, OS errors a person can act on, fault injection, progress bars, device choice."""
