"""``api.asgi:app``: the app built from ``ZHUGE_*`` settings, for ``uvicorn --workers N`` or any ASGI server."""

from api.service import create_app
from app.settings import Settings

app = create_app(Settings.from_env())
