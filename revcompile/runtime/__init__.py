"""Runtime: reversible layers swapped into the model, the autograd Function, RNG and routing replay."""
