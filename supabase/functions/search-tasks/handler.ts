// The logic of the `search-tasks` Edge Function, kept apart from Deno.serve so it can be tested and served locally.
//
// POST { "query_embedding": number[1536], "match_threshold"?: number in [0, 1] (default 0.5),
//        "match_count"?: integer 1..50 (default 10) }
// with `Authorization: Bearer <the user's access token>`  →  200 { "results": [...], "count": n }.
//
// Errors are JSON `{ "error": "<what is wrong and what to send instead>", "field"?: "<name>" }` with a 4xx status:
// 400 bad JSON or fields, 401 no/invalid/expired token (PostgREST's verdict is passed on), 403 not allowed,
// 405 not POST, 413 body over 64 KiB, 415 not JSON; 502 when the database call fails for another reason.
// The service-role key is never used here: the user's token is the only credential forwarded.
import { createClient } from "@supabase/supabase-js";

export const EMBEDDING_DIMENSIONS = 1536;
export const MAX_BODY_BYTES = 64 * 1024;
export const MAX_MATCH_COUNT = 50;

export interface SearchRequest {
  query_embedding: number[];
  match_threshold: number;
  match_count: number;
}

export interface TaskMatch {
  id: string;
  title: string;
  description: string | null;
  status: string;
  environment_id: string | null;
  similarity: number;
}

/** What the handler needs from the outside: the RPC call, made as the user whose Authorization header is given. */
export type MatchTasks = (
  authorization: string,
  args: SearchRequest,
) => Promise<{ data: TaskMatch[] | null; error: { message: string; code?: string } | null; status: number }>;

export class RequestError extends Error {
  constructor(readonly status: number, message: string, readonly field?: string) {
    super(message);
  }
}

const CORS = {
  "Access-Control-Allow-Origin": "*",
  "Access-Control-Allow-Headers": "authorization, x-client-info, apikey, content-type",
  "Access-Control-Allow-Methods": "POST, OPTIONS",
};

function json(status: number, body: unknown, extra: Record<string, string> = {}): Response {
  return new Response(JSON.stringify(body), {
    status,
    headers: { ...CORS, "Content-Type": "application/json", ...extra },
  });
}

/** Checks the decoded JSON body; throws RequestError(400) naming the first field that is wrong. */
export function validate(body: unknown): SearchRequest {
  if (typeof body !== "object" || body === null || Array.isArray(body)) {
    throw new RequestError(400, "the body must be a JSON object with query_embedding");
  }
  const input = body as Record<string, unknown>;
  const known = new Set(["query_embedding", "match_threshold", "match_count"]);
  for (const key of Object.keys(input)) {
    if (!known.has(key)) {
      throw new RequestError(400, `unknown field ${JSON.stringify(key).slice(0, 60)}; allowed: ${[...known].join(", ")}`, key);
    }
  }
  const embedding = input.query_embedding;
  if (!Array.isArray(embedding) || embedding.length !== EMBEDDING_DIMENSIONS) {
    throw new RequestError(
      400,
      `query_embedding must be an array of ${EMBEDDING_DIMENSIONS} numbers (the tasks' embedding size)`,
      "query_embedding",
    );
  }
  if (!embedding.every((x) => typeof x === "number" && Number.isFinite(x))) {
    throw new RequestError(400, "query_embedding must contain only finite numbers", "query_embedding");
  }
  if (embedding.every((x) => x === 0)) {
    throw new RequestError(400, "query_embedding must not be all zeros (cosine distance is undefined)", "query_embedding");
  }
  const threshold = input.match_threshold ?? 0.5;
  if (typeof threshold !== "number" || !Number.isFinite(threshold) || threshold < 0 || threshold > 1) {
    throw new RequestError(400, "match_threshold must be a number between 0 and 1", "match_threshold");
  }
  const count = input.match_count ?? 10;
  if (typeof count !== "number" || !Number.isInteger(count) || count < 1 || count > MAX_MATCH_COUNT) {
    throw new RequestError(400, `match_count must be an integer from 1 to ${MAX_MATCH_COUNT}`, "match_count");
  }
  return { query_embedding: embedding as number[], match_threshold: threshold, match_count: count };
}

async function readBody(req: Request): Promise<unknown> {
  const type = req.headers.get("content-type") ?? "";
  if (!type.toLowerCase().startsWith("application/json")) {
    throw new RequestError(415, "send the body as application/json");
  }
  const declared = Number(req.headers.get("content-length") ?? "0");
  if (declared > MAX_BODY_BYTES) throw new RequestError(413, `the body must be at most ${MAX_BODY_BYTES} bytes`);
  const raw = new Uint8Array(await req.arrayBuffer());
  if (raw.byteLength > MAX_BODY_BYTES) throw new RequestError(413, `the body must be at most ${MAX_BODY_BYTES} bytes`);
  try {
    return JSON.parse(new TextDecoder().decode(raw));
  } catch {
    throw new RequestError(400, "the body is not valid JSON");
  }
}

/** The function for a given way of calling match_tasks (production: supabase-js RPC through PostgREST). */
export function makeHandler(matchTasks: MatchTasks): (req: Request) => Promise<Response> {
  return async (req: Request): Promise<Response> => {
    if (req.method === "OPTIONS") return new Response(null, { status: 204, headers: CORS });
    try {
      if (req.method !== "POST") throw new RequestError(405, "use POST");
      const authorization = req.headers.get("authorization") ?? "";
      if (!/^Bearer\s+\S+\.\S+\.\S+$/i.test(authorization)) {
        throw new RequestError(401, "send the user's access token as Authorization: Bearer <token>");
      }
      const args = validate(await readBody(req));
      const { data, error, status } = await matchTasks(authorization, args);
      if (error) {
        if (status === 401) {
          // PostgREST refused the token (expired, bad signature, wrong audience): the client must refresh or sign in.
          return json(401, { error: `the access token was refused: ${error.message}` });
        }
        if (status === 403 || error.code === "42501") {
          return json(403, { error: "this user may not search tasks" });
        }
        console.error("match_tasks failed", status, error.code);
        return json(502, { error: "the search failed in the database; retry later" });
      }
      const results = data ?? [];
      return json(200, { results, count: results.length });
    } catch (err) {
      if (err instanceof RequestError) {
        const body: Record<string, string> = { error: err.message };
        if (err.field) body.field = err.field;
        return json(err.status, body, err.status === 405 ? { Allow: "POST, OPTIONS" } : {});
      }
      console.error("search-tasks failed", err instanceof Error ? err.name : typeof err);
      return json(500, { error: "internal error" });
    }
  };
}

/** match_tasks through PostgREST with the caller's own token, as Supabase runs it. */
export function supabaseMatchTasks(url: string, anonKey: string): MatchTasks {
  return async (authorization, args) => {
    const client = createClient(url, anonKey, {
      global: { headers: { Authorization: authorization } },
      auth: { persistSession: false, autoRefreshToken: false, detectSessionInUrl: false },
    });
    const { data, error, status } = await client.rpc("match_tasks", args);
    return { data: data as TaskMatch[] | null, error, status };
  };
}

export const handler = (req: Request): Promise<Response> => {
  const url = Deno.env.get("SUPABASE_URL");
  const anonKey = Deno.env.get("SUPABASE_ANON_KEY");
  if (!url || !anonKey) {
    return Promise.resolve(json(500, { error: "the function is missing SUPABASE_URL or SUPABASE_ANON_KEY" }));
  }
  return makeHandler(supabaseMatchTasks(url, anonKey))(req);
};
