// ragloom's public API from TypeScript: ingest a text, search it, stream an answer.
//
// The service is loaded at run time from ragloom's descriptor set (protos/ragloom/ragloom.pb: the router's
// proto with every import it needs, google/api and google/rpc included), so there is no code generation
// step and no googleapis checkout to find. Settings come from the environment:
//   RAGLOOM_ROUTER       the public endpoint (default 127.0.0.1:50051; `ragloom up` prints it)
//   RAGLOOM_TOKEN        a bearer token (`ragloom token --tenant NAME`), sent as `authorization: Bearer ...`
//   RAGLOOM_DESCRIPTORS  the descriptor set (default: the one in this repository)
// The last line printed is one JSON object with what came back, for scripts (and the repository's test).

import { readFileSync } from "node:fs";
import { resolve } from "node:path";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

interface Span { start: number; end: number; score: number }
interface Hit { score: number; document_id: string; source: string; text: string; shard_id: number; evidence: Span[] }
interface Coverage { partial: boolean; shards_answered: number[]; shards_failed: number[]; degraded: string[] }
interface SearchResponse { hits: Hit[]; coverage: Coverage }
interface IngestResponse { documents: { id: string; chunks: number; shard_id: number }[] }
interface Source { number: number; source: string; text: string; score: number }
interface Status { code: number; message: string }
interface AskStreamResponse {
  event: "sources" | "token" | "done" | "error";
  sources?: { sources: Source[]; coverage: Coverage; cached: boolean };
  token?: string;
  done?: { citations: number[]; abstained: boolean; completion_tokens: number; timings: { total_ms: number } };
  error?: Status;
}

const router = process.env.RAGLOOM_ROUTER || "127.0.0.1:50051";
const token = process.env.RAGLOOM_TOKEN || "";
const descriptors = process.env.RAGLOOM_DESCRIPTORS || resolve(__dirname, "../../../protos/ragloom/ragloom.pb");

// keepCase: the fields keep their proto names (document_id), as the REST API and the Python client spell them;
// oneofs: each stream message says which event it is in `event`.
const definition = protoLoader.loadFileDescriptorSetFromBuffer(readFileSync(descriptors), {
  keepCase: true, longs: String, enums: String, defaults: true, oneofs: true,
});
const proto = grpc.loadPackageDefinition(definition) as any;
const client = new proto.ragloom.router.v1.RouterService(router, grpc.credentials.createInsecure());

function metadata(): grpc.Metadata {
  const md = new grpc.Metadata();
  if (token) md.set("authorization", `Bearer ${token}`);
  return md;
}

// Every call gets a deadline: a call without one waits forever on a stuck server.
function deadline(seconds: number): grpc.CallOptions {
  return { deadline: new Date(Date.now() + seconds * 1000) };
}

function unary<T>(method: string, request: object, seconds = 60): Promise<T> {
  return new Promise((done, fail) =>
    client[method](request, metadata(), deadline(seconds), (error: grpc.ServiceError | null, reply: T) =>
      error ? fail(error) : done(reply)));
}

async function main(): Promise<void> {
  const ingested = await unary<IngestResponse>("Ingest", {
    documents: [{
      id: "typescript-example:bees", source: "typescript-example.txt",
      text: "Honeybees tell each other where flowers are by dancing. A forager returning to the hive performs a " +
        "waggle dance: the angle of the waggle run shows the direction of the flowers relative to the sun, and " +
        "its length shows how far away they are.",
    }],
  });
  console.log(`ingested ${ingested.documents.map((d) => `${d.id} (${d.chunks} chunks)`).join(", ")}`);

  const found = await unary<SearchResponse>("Search", { query: "waggle dance direction of flowers", top_k: 3 });
  found.hits.forEach((h, i) => console.log(`${i + 1}. ${h.score.toFixed(3)} ${h.source}: ${h.text.slice(0, 80)}…`));

  const question = "How do honeybees tell each other where flowers are?";
  console.log(`\nQ: ${question}\nA: `);
  const stream = client.AskStream({ question, max_tokens: 64 }, metadata(), deadline(300));
  let answer = "";
  let sources: Source[] = [];
  let done: AskStreamResponse["done"];
  for await (const message of stream as AsyncIterable<AskStreamResponse>) {
    if (message.event === "sources") sources = message.sources!.sources;
    else if (message.event === "token") { answer += message.token; process.stdout.write(message.token!); }
    else if (message.event === "done") done = message.done;
    // The stream failed after it began; the call's status follows (and rejects the loop) too.
    else if (message.event === "error") throw new Error(`AskStream failed: ${message.error!.message}`);
  }
  console.log("");
  sources.forEach((s) => console.log(`${done?.citations.includes(s.number) ? "*" : " "}[${s.number}] ${s.source}`));
  console.log(JSON.stringify({
    ingested: ingested.documents.map((d) => d.id),
    hits: found.hits.map((h) => ({ document_id: h.document_id, source: h.source, score: h.score })),
    coverage: found.coverage,
    answer, abstained: done?.abstained ?? null, citations: done?.citations ?? [],
    sources: sources.map((s) => s.source),
  }));
}

main().then(() => client.close(), (error: grpc.ServiceError | Error) => {
  const code = "code" in error ? ` (${grpc.status[error.code]})` : "";
  console.error(`ragloom example failed${code}: ${error.message}`);
  client.close();
  process.exit(1);
});
