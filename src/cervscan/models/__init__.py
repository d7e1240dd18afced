"""Networks, the checkpoint format and the model registry (shipped, installed and given models)."""
