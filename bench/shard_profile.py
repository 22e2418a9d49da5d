"""Where one shard Search call's time goes: wall time and CPU per call, client and server, the
server's split by thread, against the gRPC floor measured in the same rounds (heavy: not in CI).

Baselines, each a grpc.aio server in its own process serving the same IndexerService protos:
"floor", whose Search answers a canned response of the same hits at once (no search, no
payloads): what any Python gRPC shard pays per call on this machine before doing anything; and
"floor_knn", which first runs a raw hnswlib knn_query of the request's queries on the same corpus
(M 16, ef_construction 200, the same ef): gRPC plus the search itself, nothing of ours; and
"floor_sync", the canned floor on a synchronous grpc.server (a thread pool, no event loop): whether
Python gRPC's other server shape is cheaper per call. Against them: the shard of this checkout (`python -m mesh serve indexer`, 50k real
MiniLM vectors when bench/indexer.py --prepare has cached them, else synthetic ones) and, with
--before-root, the same shard from a checkout of earlier code. One call in flight through a
synchronous stub, at batch 1 and 32, ef chosen as in bench/indexer.py --latency; rounds
interleaved, median of each server's rounds kept.

Per call it reports: wall p50/p99; client CPU; server CPU in all, on the event loop (the main
thread, where gRPC's Python side and a small search run), in gRPC's event-engine threads, and in
the other threads (gRPC's poller, the store's thread, payload readers); and "above_floor_us":
the wall time the shard spends beyond the floor's, and "above_floor_knn_us", beyond floor_knn's:
what the shard's own code costs (filters, payloads, encoding, interceptors, thread hops).

    .venv/bin/python bench/shard_profile.py [--n 50000] [--calls 2000] [--rounds 3] [--before-root DIR]

Last line: one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.indexer import RawIndex, Shard, _percentiles, exact_top_k, ingest, latency_corpus, recall  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
TEXT = "synthetic sentence {}, about as long as a sentence of a man page is"


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds so far by thread group: the main thread, gRPC's event engine, the rest."""
    groups = {"event_loop": 0.0, "grpc_event_engine": 0.0, "other_threads": 0.0}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        name, fields = stat[stat.index("(") + 1 : stat.rindex(")")], stat.rsplit(")", 1)[1].split()
        seconds = (int(fields[11]) + int(fields[12])) / TICK
        group = "event_loop" if int(tid) == pid else "grpc_event_engine" if name.startswith("event_engine") \
            else "other_threads"
        groups[group] += seconds
    return groups


def floor_server(port_out, stop, hits: int, corpus_path: str = "", ef: int = 0, sync: bool = False) -> None:
    """The floor: IndexerService whose Search returns `hits` canned hits per query at once; with
    `corpus_path`, after a raw hnswlib knn_query of the request's queries on that corpus (its
    vectors decoded as the shard decodes them): gRPC plus the search itself, nothing of ours.
    `sync`: on a synchronous grpc.server rather than grpc.aio's."""
    from concurrent import futures

    import grpc

    from ragloom.indexer.v1 import indexer_pb2, indexer_pb2_grpc

    result = indexer_pb2.QueryResult(hits=[
        indexer_pb2.Hit(chunk_id=f"c{i}", document_id=f"c{i}", score=0.5, text=TEXT.format(i), source="bench")
        for i in range(hits)])
    canned = {}
    index = None
    if corpus_path:
        from indexer.convert import query_matrix

        index = RawIndex(np.load(corpus_path), m=16, ef_construction=200).index
        index.set_ef(ef)

    def search(request):
        batch = len(request.queries)
        if index is not None:
            index.knn_query(query_matrix(request.queries, index.dim), k=hits)
        if batch not in canned:
            canned[batch] = indexer_pb2.SearchResponse(results=[result] * batch)
        return canned[batch]

    class Floor(indexer_pb2_grpc.IndexerServiceServicer):
        async def Search(self, request, context):
            return search(request)

    class SyncFloor(indexer_pb2_grpc.IndexerServiceServicer):
        def Search(self, request, context):
            return search(request)

    if sync:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        indexer_pb2_grpc.add_IndexerServiceServicer_to_server(SyncFloor(), server)
        port_out.put(server.add_insecure_port("127.0.0.1:0"))
        server.start()
        stop.wait()
        server.stop(0)
        return

    async def main() -> None:
        server = grpc.aio.server()
        indexer_pb2_grpc.add_IndexerServiceServicer_to_server(Floor(), server)
        port_out.put(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        while not stop.is_set():
            await asyncio.sleep(0.05)
        await server.stop(0)

    asyncio.run(main())


def measure(stub, pid: int, requests: list, calls: int) -> dict:
    """`calls` Search calls one at a time (cycling through `requests`): wall and CPU per call."""
    seconds = []
    client0, server0 = os.times(), thread_cpu(pid)
    for i in range(calls):
        started = time.perf_counter()
        stub.Search(requests[i % len(requests)], timeout=30)
        seconds.append(time.perf_counter() - started)
    client1, server1 = os.times(), thread_cpu(pid)
    p50, p99 = _percentiles(seconds)
    per_call = {group: (server1[group] - server0[group]) / calls * 1e6 for group in server0}
    return {
        "p50_us": p50 * 1e6, "p99_us": p99 * 1e6, "calls_per_s": calls / sum(seconds),
        "client_cpu_us": (client1.user + client1.system - client0.user - client0.system) / calls * 1e6,
        "server_cpu_us": sum(per_call.values()), **{f"{group}_cpu_us": v for group, v in per_call.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=50_000, help="vectors in the shard")
    parser.add_argument("--queries", type=int, default=1000, help="held-out query vectors cycled through")
    parser.add_argument("--calls", type=int, default=2000, help="calls per server, batch and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ef", default="16,32,64,128", help="candidate ef; the smallest whose raw recall@10 >= 0.95")
    parser.add_argument("--before-root", type=Path, help="a checkout of earlier code, profiled the same way")
    args = parser.parse_args()

    import grpc

    from ragloom.indexer.v1 import indexer_pb2, indexer_pb2_grpc
    from tests.support.ports import free_port_block

    corpus, queries, data = latency_corpus(args.n, args.queries)
    truth = exact_top_k(corpus, queries, 10)
    raw = RawIndex(corpus, m=16, ef_construction=200)
    efs = sorted(int(e) for e in args.ef.split(","))
    ef = next((e for e in efs if recall(raw.search(queries, e)[0], truth) >= 0.95), max(efs))
    texts = [TEXT.format(row) for row in range(len(corpus))]

    stop = multiprocessing.Event()
    with tempfile.TemporaryDirectory(prefix="ragloom-profile-") as folder:
        np.save(Path(folder) / "corpus.npy", corpus)
        floors, servers = [], {}
        for name, path, sync in (("floor", "", False), ("floor_knn", str(Path(folder) / "corpus.npy"), False),
                                 ("floor_sync", "", True)):
            port_out = multiprocessing.Queue()
            floors.append(multiprocessing.Process(target=floor_server, args=(port_out, stop, 10, path, ef, sync),
                                                  daemon=True))
            floors[-1].start()
            servers[name] = (f"127.0.0.1:{port_out.get(timeout=120)}", floors[-1].pid)
        shards = {"shard": Shard(Path(folder) / "shard", 0, free_port_block(1), Path(folder))}
        if args.before_root:
            shards["before"] = Shard(Path(folder) / "before", 0, free_port_block(1), Path(folder),
                                     root=args.before_root)
        try:
            for name, shard in shards.items():
                shard.start()
                asyncio.run(_fill(shard.address, texts, corpus))
                servers[name] = (shard.address, shard.process.pid)
            stubs = {name: indexer_pb2_grpc.IndexerServiceStub(grpc.insecure_channel(address))
                     for name, (address, _) in servers.items()}
            requests = {batch: [indexer_pb2.SearchRequest(
                queries=[indexer_pb2.Vector(values=q.tolist()) for q in queries[s : s + batch]], k=10, ef=ef)
                for s in range(0, len(queries) - batch + 1, batch)] for batch in (1, 32)}
            rounds: dict[str, list[dict]] = {}
            for batch in (1, 32):  # warm-up: payload caches, every code path
                for name, stub in stubs.items():
                    measure(stub, servers[name][1], requests[batch], len(requests[batch]))
            for _ in range(args.rounds):
                for batch in (1, 32):
                    for name, stub in stubs.items():
                        calls = args.calls if batch == 1 else max(1, args.calls // 8)
                        rounds.setdefault(f"{name}_b{batch}", []).append(
                            measure(stub, servers[name][1], requests[batch], calls))
        finally:
            for shard in shards.values():
                if shard.process and shard.process.poll() is None:
                    shard.stop()
            stop.set()
            for floor in floors:
                floor.join(timeout=30)

    figures: dict = {"ef": ef, "vectors": args.n, "data": data}
    for key, measured in rounds.items():
        figures[key] = {field: round(statistics.median(m[field] for m in measured), 1) for field in measured[0]}
    for batch in (1, 32):
        floor_p50, knn_p50 = figures[f"floor_b{batch}"]["p50_us"], figures[f"floor_knn_b{batch}"]["p50_us"]
        for name in shards:
            mine = figures[f"{name}_b{batch}"]
            mine["above_floor_us"] = round(mine["p50_us"] - floor_p50, 1)
            mine["above_floor_knn_us"] = round(mine["p50_us"] - knn_p50, 1)
    for key in rounds:
        print(f"{key:10s} {figures[key]}", file=sys.stderr)
    figures["baseline"] = ("floor: a grpc.aio IndexerService answering canned hits at once; floor_knn: the same "
                           "after a raw hnswlib knn_query of the queries (same corpus, M, ef); floor_sync: the "
                           "canned floor on a synchronous grpc.server; same protos, same client, rounds "
                           "interleaved with the shards'")
    print(json.dumps(figures))


async def _fill(address: str, texts: list[str], corpus: np.ndarray) -> None:
    import grpc

    from ragloom.indexer.v1 import indexer_pb2_grpc

    channel = grpc.aio.insecure_channel(address, options=[("grpc.max_send_message_length", 1 << 28)])
    try:
        await ingest([indexer_pb2_grpc.IndexerServiceStub(channel)], texts, corpus, [list(range(len(corpus)))])
    finally:
        await channel.close()


if __name__ == "__main__":
    main()
