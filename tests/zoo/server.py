"""A real HTTP server on 127.0.0.1 for download tests: serves files from memory, honours Range requests,
and can corrupt a byte or drop the connection part-way through a transfer."""
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional


class FileServer:
    def __init__(self, files: Dict[str, bytes], port: int = 0):
        self.files = dict(files)
        self.corrupt = False
        self.die_after: Optional[int] = None  # bytes of the body to send before dropping the connection
        self.kill_after: Optional[int] = None  # ... before dropping it and shutting the whole server down
        self.requests: List[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                data = server.files.get(self.path)
                server.requests.append(dict(path=self.path, range=self.headers.get("Range")))
                if data is None:
                    self.send_error(404)
                    return
                if server.corrupt:
                    data = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
                start, status = 0, 200
                rng = self.headers.get("Range")
                if rng and rng.startswith("bytes="):
                    start = int(rng[len("bytes="):].split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.end_headers()
                        return
                    status = 206
                body = data[start:]
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                cut = server.kill_after if server.kill_after is not None else server.die_after
                if cut is not None:
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    if server.kill_after is not None:
                        threading.Thread(target=server.stop, daemon=True).start()
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs=dict(poll_interval=0.02), daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        if self.thread is None:
            return
        self.thread, thread = None, self.thread
        self.httpd.shutdown()
        self.httpd.server_close()
        thread.join()


def cached_files():
    """What the zoo cache holds besides the lock files that serialise downloads."""
    from zoo.download import cache_dir

    return sorted(p.name for p in cache_dir().iterdir() if p.suffix != ".lock")
