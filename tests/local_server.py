"""An HTTP server on 127.0.0.1 for the download tests: no test touches the internet."""

from __future__ import annotations

import http.server
import threading


class LocalServer:
    """Serves ``files`` (URL path -> bytes) and records the paths asked for; paths in ``drop``
    send half the body, then hang up. A context manager: started on enter, stopped on exit."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.drop: set[str] = set()
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                outer.requests.append(self.path)
                blob = outer.files.get(self.path)
                if blob is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(blob)))
                self.end_headers()
                if self.path in outer.drop:
                    self.wfile.write(blob[: len(blob) // 2])
                    self.close_connection = True
                    return
                self.wfile.write(blob)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> LocalServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop serving (a test may do it early: nothing listens there any more)."""
        self.httpd.shutdown()
        self.httpd.server_close()
