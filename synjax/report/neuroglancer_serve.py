"""Serving a run's neuroglancer state: local files over HTTP, the viewer from Python.

A state from `neuroglancer_state` names its volumes by `file://` URLs, which
a browser cannot read. `serve` starts one static file server (neuroglancer's
`StaticFileServer`, CORS headers included) per folder that holds a layer's
files, rewrites each source to its HTTP URL, and opens the state in a
`neuroglancer.Viewer`, whose server also hands the browser neuroglancer's own
client. Needs the `neuroglancer` package (`pip install synjax[view]`); it is
imported only here.
"""

from __future__ import annotations

import copy
import dataclasses
import pathlib
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any

from synjax.errors import ConfigError

FILE_SCHEME = "file://"


def _sources(layer: Mapping[str, Any]) -> list:
    """The layer's source entries (neuroglancer allows one or a list; each a str or dict)."""
    source = layer.get("source")
    if source is None:
        return []
    return source if isinstance(source, list) else [source]


def _url(source) -> str:
    return source if isinstance(source, str) else source.get("url", "")


def _split(url: str) -> tuple[str, pathlib.Path] | None:
    """`zarr://file:///a/b.zarr` -> ("zarr://", /a/b.zarr); None for a non-file URL."""
    at = url.find(FILE_SCHEME)
    if at < 0:
        return None
    path = urllib.request.url2pathname(urllib.parse.urlparse(url[at:]).path)
    return url[:at], pathlib.Path(path)


def local_folders(state: Mapping[str, Any]) -> list[pathlib.Path]:
    """The folders that hold the state's `file://` sources, each once, sorted."""
    found = set()
    for layer in state.get("layers", []):
        for source in _sources(layer):
            split = _split(_url(source))
            if split is not None:
                found.add(split[1].parent)
    return sorted(found)


def rewrite_sources(state: Mapping[str, Any], served: Mapping[pathlib.Path, str]) -> dict:
    """A copy of `state` with each `file://` source replaced by its served URL.

    Args:
      state: a neuroglancer state (JSON).
      served: folder -> the HTTP URL its contents are served at.

    Returns:
      The state, `prefix + file:///folder/name` -> `prefix + URL/name`.

    Raises:
      ConfigError: a `file://` source's folder is not in `served`.
    """
    state = copy.deepcopy(dict(state))
    for layer in state.get("layers", []):
        entries = _sources(layer)
        for index, source in enumerate(entries):
            split = _split(_url(source))
            if split is None:
                continue
            prefix, path = split
            if path.parent not in served:
                raise ConfigError(f"layer {layer.get('name')!r}: {path.parent} is not served")
            url = f"{prefix}{served[path.parent].rstrip('/')}/{urllib.parse.quote(path.name)}"
            if isinstance(source, str):
                entries[index] = url
            else:
                source["url"] = url
        if isinstance(layer.get("source"), str):
            layer["source"] = entries[0]
    return state


@dataclasses.dataclass
class ServedRun:
    """A running viewer of a run's state.

    Attributes:
      url: the viewer's URL, to open in a browser.
      file_urls: folder -> the HTTP URL its files are served at.
    """

    url: str
    file_urls: dict[pathlib.Path, str]
    _servers: list
    _viewer: Any

    def stop(self) -> None:
        """Stops the file servers (the viewer's server stops with the process)."""
        for server in self._servers:
            server.stop()


def serve(state: Mapping[str, Any], bind_address: str = "127.0.0.1", port: int = 0) -> ServedRun:
    """Serves `state`'s files and opens it in a neuroglancer viewer.

    Args:
      state: a state from `neuroglancer_state.read_state`.
      bind_address: the address the servers listen on ("0.0.0.0" to reach
        them from another machine).
      port: the viewer's port; 0 picks a free one.

    Returns:
      The running viewer; its `url` opens the state.

    Raises:
      ConfigError: the `neuroglancer` package is not installed.
    """
    try:
        import neuroglancer
        from neuroglancer.static_file_server import StaticFileServer
    except ImportError:
        raise ConfigError(
            "synjax.view needs the neuroglancer package: pip install 'synjax[view]'"
        ) from None
    servers, served = [], {}
    for folder in local_folders(state):
        server = StaticFileServer(str(folder), bind_address=bind_address, daemon=True)
        servers.append(server)
        served[folder] = server.url
    neuroglancer.set_server_bind_address(bind_address, port)
    viewer = neuroglancer.Viewer()
    viewer.set_state(neuroglancer.ViewerState(rewrite_sources(state, served)))
    return ServedRun(viewer.get_viewer_url(), served, servers, viewer)
