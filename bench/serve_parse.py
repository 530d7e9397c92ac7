"""The server's multipart parsing, per request: ours (vision_rwkv.serve.app) against the standard library's
email parser (what the app used before), on bench/serve_load.py's one-image request, in one process.

    python bench/serve_parse.py [--repeats 2000] [--rounds 3]

Both hold the GIL throughout, which the server's batching worker needs between decoding steps.
"""

from __future__ import annotations

import argparse
import email.parser
import email.policy
import sys
import time
from pathlib import Path

import _checkout  # noqa: F401 (this checkout's vision_rwkv before any installed one)

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import serve_load  # noqa: E402

from vision_rwkv.serve.app import _parse_multipart  # noqa: E402


def email_parse(content_type: str, body: bytes):
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    images, fields = [], {}
    for part in message.iter_parts():
        data = part.get_payload(decode=True) or b""
        if part.get_filename() is not None:
            images.append((part.get_filename(), data))
        elif part.get_param("name", header="content-disposition"):
            fields[str(part.get_param("name", header="content-disposition"))] = data.decode("utf-8", "replace")
    return images, fields


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    body, content_type = serve_load.multipart(serve_load.IMAGE.read_bytes(), {"max_new_tokens": 20})
    if _parse_multipart(content_type, body) != email_parse(content_type, body):
        raise SystemExit("the two parsers disagree on the request")
    best = {}
    for name, fn in (("email.parser", email_parse), ("ours", _parse_multipart)):
        times = []
        for _ in range(args.rounds):
            t = time.perf_counter()
            for _ in range(args.repeats):
                fn(content_type, body)
            times.append((time.perf_counter() - t) / args.repeats * 1e6)
        best[name] = min(times)
        print(f"{name:>12}: " + ", ".join(f"{x:.1f}" for x in times) + " us a request", flush=True)
    print(f"{len(body)}-byte request: ours {best['ours']:.1f} us against email.parser {best['email.parser']:.1f} us "
          f"({best['email.parser'] / best['ours']:.0f}x)")
    return best


if __name__ == "__main__":
    main()
