"""The screening pipeline: per-image steps, the quality gate, the vote and the patient decision, and the
files a screen writes."""
