from lightning_mobillm.strategies.server_assisted import ServerAssistedStrategy, ServerError, ServerOptimizer

__all__ = ["ServerAssistedStrategy", "ServerError", "ServerOptimizer"]
