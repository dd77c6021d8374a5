"""Running: the home lock, OS errors a person can act on, fault injection, progress bars, device choice,
and the lease that fences a cluster run."""
