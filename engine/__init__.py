"""geoexplora engine: model, LoRA, objectives, data, trainer, eval."""
