"""Graph passes. Each is a pure function of a graphsurgeon Graph (it works on a copy) whose
docstring states the invariant it establishes."""
