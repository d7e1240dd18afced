"""PDF referral reports and run summaries, with Grad-CAM heatmaps."""
