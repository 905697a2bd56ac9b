from dsv2.serve.app import ServerConfig, create_app

__all__ = ["ServerConfig", "create_app"]
