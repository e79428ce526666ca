"""Everything that stands in for hardware on the bench: the synthetic nerve
simulator (movements, units, signals), the virtual chip and the virtual hand on
pseudo-terminals.  Nothing that ``neurohand run`` imports may import this."""
