// Unit tests of the search-tasks logic: validation and the HTTP contract, with match_tasks replaced by a recorder.
// Run: deno test supabase/functions/search-tasks/   (tests/test_supabase_edge_function.py runs it, and the
// end-to-end test against a real database with RLS in force).
import { deepStrictEqual as assertEquals } from "node:assert/strict";
import { EMBEDDING_DIMENSIONS, makeHandler, type MatchTasks, validate } from "./handler.ts";

const TOKEN = "Bearer aaa.bbb.ccc";
const vector = (x = 0.1) => Array.from({ length: EMBEDDING_DIMENSIONS }, () => x);

function recorder(result: Awaited<ReturnType<MatchTasks>> = { data: [], error: null, status: 200 }) {
  const calls: { authorization: string; args: unknown }[] = [];
  const fn: MatchTasks = (authorization, args) => {
    calls.push({ authorization, args });
    return Promise.resolve(result);
  };
  return { calls, fn };
}

function post(body: unknown, headers: Record<string, string> = {}): Request {
  return new Request("http://localhost/search-tasks", {
    method: "POST",
    headers: { "Content-Type": "application/json", Authorization: TOKEN, ...headers },
    body: typeof body === "string" ? body : JSON.stringify(body),
  });
}

Deno.test("defaults and a forwarded token", async () => {
  const { calls, fn } = recorder({ data: [{ id: "1", title: "t", description: null, status: "pending", environment_id: null, similarity: 0.9 }], error: null, status: 200 });
  const res = await makeHandler(fn)(post({ query_embedding: vector() }));
  assertEquals(res.status, 200);
  assertEquals((await res.json()).count, 1);
  assertEquals(calls[0].authorization, TOKEN);
  assertEquals((calls[0].args as { match_threshold: number; match_count: number }).match_threshold, 0.5);
  assertEquals((calls[0].args as { match_count: number }).match_count, 10);
});

Deno.test("validation names the field", () => {
  const cases: [unknown, string][] = [
    [[], "the body must be a JSON object with query_embedding"],
    [{ query_embedding: [1, 2] }, "query_embedding"],
    [{ query_embedding: vector().map((x, i) => (i === 3 ? "x" : x)) }, "query_embedding"],
    [{ query_embedding: vector(0) }, "query_embedding"],
    [{ query_embedding: vector(), match_threshold: 2 }, "match_threshold"],
    [{ query_embedding: vector(), match_count: 0 }, "match_count"],
    [{ query_embedding: vector(), match_count: 1.5 }, "match_count"],
    [{ query_embedding: vector(), user_id: "someone-else" }, "user_id"],
  ];
  for (const [body, field] of cases) {
    try {
      validate(body);
      throw new Error(`accepted ${JSON.stringify(body).slice(0, 40)}`);
    } catch (err) {
      const e = err as { status?: number; field?: string; message: string };
      assertEquals(e.status, 400, e.message);
      if (field.includes(" ")) assertEquals(e.message, field);
      else assertEquals(e.field, field);
    }
  }
});

Deno.test("HTTP errors are clear 4xx and never reach the database", async () => {
  const { calls, fn } = recorder();
  const handler = makeHandler(fn);
  const expect = async (req: Request, status: number) => {
    const res = await handler(req);
    assertEquals(res.status, status);
    if (status !== 204) assertEquals(typeof (await res.json()).error, "string");
  };
  await expect(new Request("http://localhost/x", { method: "GET", headers: { Authorization: TOKEN } }), 405);
  await expect(post({ query_embedding: vector() }, { Authorization: "" }), 401);
  await expect(post({ query_embedding: vector() }, { Authorization: "Bearer anon-key-not-a-jwt" }), 401);
  await expect(post("{not json"), 400);
  await expect(post({ query_embedding: vector() }, { "Content-Type": "text/plain" }), 415);
  await expect(post(JSON.stringify({ query_embedding: vector(), pad: "x".repeat(70_000) })), 413);
  assertEquals(calls.length, 0);
  assertEquals((await handler(new Request("http://localhost/x", { method: "OPTIONS" }))).status, 204);
});

Deno.test("PostgREST's refusals are passed on", async () => {
  const refused = makeHandler(recorder({ data: null, error: { message: "JWT expired", code: "PGRST303" }, status: 401 }).fn);
  const res = await refused(post({ query_embedding: vector() }));
  assertEquals(res.status, 401);
  assertEquals((await res.json()).error, "the access token was refused: JWT expired");
  const broken = makeHandler(recorder({ data: null, error: { message: "boom", code: "XX000" }, status: 500 }).fn);
  assertEquals((await broken(post({ query_embedding: vector() }))).status, 502);
});
