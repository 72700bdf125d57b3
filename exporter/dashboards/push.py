"""Upload the dashboards to Grafana: the folder is found by title or created with a stable
uid, and every dashboard is posted with ``overwrite`` under its own stable uid, so pushing
twice changes nothing but the version.

Grafana is reached through :class:`GrafanaAPI`, three calls wide; :func:`client_api` adapts
``grafana-client`` (the optional ``grafana`` extra, imported only here because it replaces
urllib3 with urllib3-future in the environment it is installed into).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, Protocol

MESSAGE = "llm-exporter dashboards push"


class GrafanaAPI(Protocol):
    def folders(self) -> list[dict[str, Any]]:
        """Every folder: at least ``uid`` and ``title``."""

    def create_folder(self, title: str, uid: str) -> dict[str, Any]: ...

    def post_dashboard(self, payload: dict[str, Any]) -> dict[str, Any]:
        """POST /api/dashboards/db with ``payload``."""


class PushError(RuntimeError):
    """Grafana refused a call, or the client library is missing."""


def folder_uid(title: str) -> str:
    """A stable uid for a folder title (Grafana allows 40 characters of [a-zA-Z0-9_-])."""
    return (re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "llm-exporter")[:40]


def ensure_folder(api: GrafanaAPI, title: str) -> str:
    """The uid of the folder called ``title``, created when there is none."""
    for f in api.folders():
        if f.get("title") == title:
            return str(f["uid"])
    created = api.create_folder(title, folder_uid(title))
    return str(created.get("uid", folder_uid(title)))


def push(api: GrafanaAPI, dashboards: Iterable[dict[str, Any]], folder: str) -> list[str]:
    """Upload ``dashboards`` into ``folder``; returns their uids."""
    uid = ensure_folder(api, folder)
    pushed = []
    for d in dashboards:
        # id null: Grafana matches on uid, so the same dashboard is replaced, never duplicated.
        api.post_dashboard({"dashboard": {**d, "id": None}, "folderUid": uid,
                            "overwrite": True, "message": MESSAGE})
        pushed.append(str(d["uid"]))
    return pushed


class _ClientAPI:
    def __init__(self, api: Any, error: type[Exception]) -> None:
        self._api = api
        self._error = error

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except self._error as e:
            raise PushError(f"{what}: {e}") from e

    def folders(self) -> list[dict[str, Any]]:
        return list(self._call("listing folders", self._api.folder.get_all_folders))

    def create_folder(self, title: str, uid: str) -> dict[str, Any]:
        return dict(self._call(f"creating folder {title!r}", self._api.folder.create_folder,
                               title, uid=uid))

    def post_dashboard(self, payload: dict[str, Any]) -> dict[str, Any]:
        return dict(self._call(f"uploading {payload['dashboard'].get('uid')}",
                               self._api.dashboard.update_dashboard, payload))


def client_api(url: str, token: str, timeout: float = 30.0) -> GrafanaAPI:
    """A :class:`GrafanaAPI` over grafana-client, authenticating with a service-account
    token."""
    try:
        from grafana_client import GrafanaApi
        from grafana_client.client import GrafanaException
    except ImportError as e:
        raise PushError("pushing needs grafana-client: pip install 'llm-exporter[grafana]' "
                        "(best in its own virtual environment: it replaces urllib3 with "
                        "urllib3-future)") from e
    return _ClientAPI(GrafanaApi.from_url(url, credential=token, timeout=timeout),
                      GrafanaException)
