from dsv2.model.transformer import LatentCache, Transformer

__all__ = ["LatentCache", "Transformer"]
