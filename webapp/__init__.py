"""The local web page and JSON API that score photos with a TANet (``serve.py`` runs it).

Needs the optional requirements of ``requirements-deploy.txt`` (FastAPI, uvicorn, python-multipart).
"""
from .app import Limits, create_app, model_info

__all__ = ["Limits", "create_app", "model_info"]
