"""Model: towers, projector, the Video-LLaVA model, builders, checkpoint loading."""
