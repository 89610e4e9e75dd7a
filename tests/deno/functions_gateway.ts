// A local stand-in for the Edge Functions gateway: serves supabase/functions/search-tasks at
// http://127.0.0.1:<port>/functions/v1/search-tasks, the path FunctionsService (and supabase-js) invoke.
// The platform's gateway also verifies the JWT before the function runs (verify_jwt); here the function's own
// check and PostgREST's (the local stand-in) are what refuse bad tokens.
// Usage: deno run --config supabase/functions/search-tasks/deno.json --allow-net=127.0.0.1 --allow-env \
//          tests/deno/functions_gateway.ts <port>
import { handler } from "../../supabase/functions/search-tasks/handler.ts";

const port = Number(Deno.args[0]);
Deno.serve({ hostname: "127.0.0.1", port, onListen: () => console.log(`listening on ${port}`) }, (req) => {
  if (new URL(req.url).pathname === "/functions/v1/search-tasks") return handler(req);
  return new Response(JSON.stringify({ code: "NOT_FOUND", message: "Requested function was not found" }), {
    status: 404,
    headers: { "content-type": "application/json", "sb-error-code": "NOT_FOUND" },
  });
});
