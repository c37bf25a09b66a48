"""An OTLP/HTTP sink over TLS for tests/telemetry.rs: answers POST /v1/traces with 200 and
prints one line per export ("POST /v1/traces BYTES"). Arguments: CERT KEY; it prints
"listening PORT" once it accepts connections."""
import http.server
import ssl
import sys


class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        size = int(self.headers.get('Content-Length', 0))
        self.rfile.read(size)
        print('POST', self.path, size, flush=True)
        self.send_response(200)
        self.send_header('Content-Type', 'application/x-protobuf')
        self.send_header('Content-Length', '0')
        self.end_headers()

    def log_message(self, *args):
        pass


server = http.server.HTTPServer(('127.0.0.1', 0), Handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(sys.argv[1], sys.argv[2])
server.socket = context.wrap_socket(server.socket, server_side=True)
print('listening', server.server_address[1], flush=True)
server.serve_forever()
