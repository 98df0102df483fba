"""pipeline — data, losses, models, training and reconstruction for recon3d."""
