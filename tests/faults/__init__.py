"""Fault tests: kill, freeze or restart a component at each step, then look for leaks."""
