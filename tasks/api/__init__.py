"""The HTTP API and its page (``pg-broker api``): users submit package jobs,
watch them progress live and play the results. See :mod:`tasks.api.app`."""

from tasks.api.app import Api, create_app

__all__ = ["Api", "create_app", "serve"]


def serve(host: str = "127.0.0.1", port: int = 8000, *, dev: bool = False) -> None:
    """Run the API with uvicorn until interrupted (one process)."""
    import uvicorn

    uvicorn.run(create_app(dev=dev), host=host, port=port, log_level="info",
                proxy_headers=True, timeout_graceful_shutdown=5)
