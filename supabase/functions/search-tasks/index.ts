// Edge Function `search-tasks`: semantic search over the calling user's tasks (public.match_tasks).
// The request's own Authorization header is forwarded to PostgREST, so row-level security decides which tasks
// can match: a user only ever finds their own. Deployed with `supabase functions deploy search-tasks`; the
// platform provides SUPABASE_URL and SUPABASE_ANON_KEY. The logic lives in handler.ts (tested with `deno test`).
import { handler } from "./handler.ts";

Deno.serve(handler);
