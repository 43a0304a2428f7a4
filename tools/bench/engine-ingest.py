#!/usr/bin/env python3
"""Documents/s that a search engine itself takes through `_bulk`, without embedjoin.

Creates an index with the mapping embedjoin's bootstrap writes for Elasticsearch (one
dense_vector per part; HNSW-indexed with cosine, or only stored with --stored), then sends
pre-encoded `_bulk` bodies of --bulk documents from --in-flight concurrent connections, the
way embedjoin's bulk writer does, and prints documents/s over the wall time (first request
sent to last answered, a final refresh excluded). Vectors are random, seeded, written as
shortest-roundtrip float32 JSON numbers. Standard library only.

  tools/bench/engine-ingest.py http://127.0.0.1:9200 --docs 20000 --dims 384,512
  tools/bench/engine-ingest.py http://127.0.0.1:9200 --docs 20000 --dims 384,512 --stored
"""
import argparse
import concurrent.futures
import http.client
import json
import random
import struct
import time
import urllib.parse


def f32_text(x):
    """The shortest decimal that reads back as the same float32, as embedjoin writes it."""
    v = struct.unpack("f", struct.pack("f", x))[0]
    for digits in range(6, 10):
        text = f"{v:.{digits}g}"
        if struct.unpack("f", struct.pack("f", float(text)))[0] == v:
            return text
    return repr(v)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--docs", type=int, default=20000)
    ap.add_argument("--dims", default="384,512")
    ap.add_argument("--bulk", type=int, default=500, help="documents per _bulk request (embedjoin: 500)")
    ap.add_argument("--in-flight", type=int, default=4, help="concurrent requests (embedjoin: 4)")
    ap.add_argument("--stored", action="store_true", help="index: false (no HNSW graph)")
    ap.add_argument("--index", default=None)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    dims = [int(d) for d in a.dims.split(",")]
    index = a.index or ("ingest-stored" if a.stored else "ingest-hnsw")
    u = urllib.parse.urlparse(a.url)

    def call(method, path, body=None, ctype="application/json"):
        c = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
        c.request(method, path, body=body, headers={"content-type": ctype} if body else {})
        r = c.getresponse()
        data = r.read()
        c.close()
        return r.status, data

    call("DELETE", f"/{index}")
    fields = {}
    for i, d in enumerate(dims):
        spec = {"type": "dense_vector", "dims": d, "index": not a.stored}
        if not a.stored:
            spec["similarity"] = "cosine"
        fields[f"part_{i + 1}"] = spec
    fields["id"] = {"type": "keyword"}
    status, body = call("PUT", f"/{index}", json.dumps({"mappings": {"properties": fields}}))
    assert status == 200, body

    rng = random.Random(a.seed)
    bodies = []
    for start in range(0, a.docs, a.bulk):
        lines = []
        for n in range(start, min(start + a.bulk, a.docs)):
            fields = [f'"id":"sku-{n}"']
            for i, d in enumerate(dims):
                vector = ",".join(f32_text(rng.uniform(-1, 1)) for _ in range(d))
                fields.append(f'"part_{i + 1}":[{vector}]')
            lines.append(json.dumps({"index": {"_id": f"sku-{n}"}}))
            lines.append("{" + ",".join(fields) + "}")
        bodies.append(("\n".join(lines) + "\n").encode())
    mb = sum(len(b) for b in bodies) / 1e6

    def send(b):
        status, data = call("POST", f"/{index}/_bulk?filter_path=errors", b, "application/x-ndjson")
        assert status == 200 and b'"errors":false' in data, (status, data[:300])

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(a.in_flight) as pool:
        list(pool.map(send, bodies))
    wall = time.perf_counter() - t0
    call("POST", f"/{index}/_refresh")
    _, count = call("GET", f"/{index}/_count")
    counted = json.loads(count)["count"]
    assert counted == a.docs, counted
    kind = "stored only (index: false)" if a.stored else "HNSW (int8_hnsw, cosine)"
    print(f"{a.docs} documents, dims {a.dims}, {kind}: {wall:.1f} s, {a.docs / wall:,.0f} documents/s, "
          f"{mb / wall:.1f} MB/s of _bulk bodies ({mb:.0f} MB), {a.bulk}/request, {a.in_flight} in flight")


if __name__ == "__main__":
    main()
