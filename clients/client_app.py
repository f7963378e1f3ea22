"""The ClientApp entry module named in pyproject.toml (`flwr run .`); the logic is `dsl_fed.federated.client_app`.

It lives in the app bundle, so a relative ``config`` in the run config (the default preset) is looked up here.
"""

from pathlib import Path

from dsl_fed.federated.client_app import create_app

app = create_app(app_dir=Path(__file__).resolve().parents[1])
