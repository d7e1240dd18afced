"""Training of each model role, and the validation every classifier training checks itself with."""
