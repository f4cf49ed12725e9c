"""`dsi-jax serve INDEX`: a search page for an index, on the standard library's HTTP server.

  GET  /                 the page (one HTML file, no build step): a text box and an image upload
  POST /search           {"text": ...} | {"image": base64 bytes} | {"item": key}, "k": n
                         -> {"results": [{"rank", "key", "score", "id", "text", "thumb"}]}
  GET  /thumb?key=KEY    the item's image as the model sees it (PNG), for image indexes

A result can be the next query ({"item": key}). A bad request (an undecodable upload, an
unknown key, a text query to an image index) is answered with a 400 and {"error": one line},
shown on the page; the server keeps serving. `/?q=TEXT` or `/?item=KEY` runs that search as the
page loads (bookmarkable; what the browser test and the README's screenshot use).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from dsi_jax.index import Index

MAX_BODY = 20 * 1024 * 1024  # an upload larger than this is refused

log = logging.getLogger(__name__)


class BadRequest(ValueError):
  """A request the page should explain (400)."""


class Searcher:
  """The loaded index behind the page; one search at a time."""

  def __init__(self, index: Index):
    self.index = index
    self.lock = threading.Lock()
    self.live = set(index.keys)

  def query(self, body: dict) -> list[dict]:
    k = body.get("k", 12)
    if not isinstance(k, int) or not 1 <= k <= 100:
      raise BadRequest("k must be an integer from 1 to 100")
    kinds = [name for name in ("text", "image", "item") if body.get(name)]
    if len(kinds) != 1:
      raise BadRequest("send one of: a text, an image, an item")
    with self.lock:
      if kinds == ["text"]:
        if not isinstance(body["text"], str):
          raise BadRequest("the text must be a string")
        if "text" not in self.index.run.spec.queries:
          raise BadRequest("this index searches by image; upload an image")
        hits = self.index.search(texts=[body["text"]], k=k)[0]
      elif kinds == ["image"]:
        if "image" not in self.index.run.spec.queries:
          raise BadRequest("this index searches by text; type a query")
        try:
          data = base64.b64decode(body["image"], validate=True)
        except (binascii.Error, TypeError):
          raise BadRequest("the upload is not base64 data") from None
        try:
          hits = self.index.search(images=[data], k=k)[0]
        except ValueError:
          raise BadRequest("the upload is not an image this server can read") from None
      else:
        hits = self.item_query(body["item"], k)
    for hit in hits:
      hit["thumb"] = (
        "/thumb?" + urllib.parse.urlencode({"key": hit["key"]})
        if self.index.kind == "images"
        else None
      )
      hit.pop("path", None)
    return hits

  def item_query(self, key: Any, k: int) -> list[dict]:
    """An indexed item as the query: its image as the model saw it, or its text."""
    if not isinstance(key, str) or key not in self.live:
      raise BadRequest(f"no item {key!r} in the index")
    if self.index.kind == "texts":
      return self.index.search(texts=[self.index.items["texts"][self.index._rows[key]]], k=k)[0]
    from dsi_jax.data import inputs

    pixels = inputs.image_inputs(self.index.thumbnail(key)[None])
    return self.index.search_inputs(pixels, k=k)[0]

  def thumbnail_png(self, key: str) -> bytes:
    import cv2

    if key not in self.index._rows or self.index.pixels is None:
      raise BadRequest(f"no image {key!r} in the index")
    ok, png = cv2.imencode(".png", cv2.cvtColor(self.index.thumbnail(key), cv2.COLOR_RGB2BGR))
    return png.tobytes()


def make_handler(searcher: Searcher, page: str):
  class Handler(BaseHTTPRequestHandler):
    server_version = "dsi-jax"

    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
      log.info("%s %s", self.address_string(), format % args)

    def send(self, status: int, body: bytes, content_type: str) -> None:
      self.send_response(status)
      self.send_header("Content-Type", content_type)
      self.send_header("Content-Length", str(len(body)))
      self.end_headers()
      self.wfile.write(body)

    def send_json(self, status: int, obj: Any) -> None:
      self.send(status, json.dumps(obj).encode(), "application/json")

    def do_GET(self):  # noqa: N802 (the base class's name)
      url = urllib.parse.urlparse(self.path)
      if url.path == "/":
        self.send(HTTPStatus.OK, page.encode(), "text/html; charset=utf-8")
      elif url.path == "/thumb":
        key = urllib.parse.parse_qs(url.query).get("key", [""])[0]
        try:
          self.send(HTTPStatus.OK, searcher.thumbnail_png(key), "image/png")
        except BadRequest as e:
          self.send_json(HTTPStatus.NOT_FOUND, {"error": str(e)})
      else:
        self.send_json(HTTPStatus.NOT_FOUND, {"error": f"no page {url.path}"})

    def do_POST(self):  # noqa: N802
      if urllib.parse.urlparse(self.path).path != "/search":
        return self.send_json(HTTPStatus.NOT_FOUND, {"error": "POST to /search"})
      try:
        size = int(self.headers.get("Content-Length", "0"))
      except ValueError:
        size = -1
      if size < 0 or size > MAX_BODY:
        self.close_connection = True
        return self.send_json(
          HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
          {"error": f"the request is over {MAX_BODY // 2**20} MB; send a smaller image"},
        )
      try:
        body = json.loads(self.rfile.read(size) or b"null")
        if not isinstance(body, dict):
          raise BadRequest("send a JSON object")
        results = searcher.query(body)
      except (BadRequest, json.JSONDecodeError, UnicodeDecodeError) as e:
        message = str(e) if isinstance(e, BadRequest) else "the request is not JSON"
        return self.send_json(HTTPStatus.BAD_REQUEST, {"error": message})
      except Exception as e:  # the page says so and the server goes on
        log.exception("search failed")
        return self.send_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"search failed: {e}"})
      self.send_json(HTTPStatus.OK, {"results": results})

  return Handler


def make_server(index: Index, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
  """A server for `index` (port 0: any free port, `server.server_address[1]`)."""
  from importlib import resources

  page = resources.files("dsi_jax").joinpath("page.html").read_text()
  page = page.replace("__KIND__", index.kind).replace("__COUNT__", str(len(index)))
  return ThreadingHTTPServer((host, port), make_handler(Searcher(index), page))


def serve(path: str, host: str = "127.0.0.1", port: int = 8000) -> None:
  index = Index.load(path)
  server = make_server(index, host, port)
  print(
    f"searching {len(index)} {index.kind} of {path} at http://{host}:{server.server_address[1]}/"
  )
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()
