// The README's example: a PGlite replica of the signed-in user's tasks, synced through the pgferry shape proxy.
//
//   pgferry dev up
//   export TOKEN=$(pgferry dev token --user 6f1c2d4e-0000-4000-8000-000000000001)
//   node tests/js/sync-tasks-example.mjs
//
// Environment: TOKEN (required: a Supabase access token), PROXY_URL (default http://127.0.0.1:54351, the local
// stack's proxy), PGLITE_DIR (default: in memory; a directory keeps the replica and resumes on the next run),
// ONCE=1 (print the table once it is up to date and exit: what the test does).
import { PGlite } from '@electric-sql/pglite'
import { electricSync } from '@electric-sql/pglite-sync'

const token = process.env.TOKEN
if (!token) {
  console.error('set TOKEN to an access token, e.g. export TOKEN=$(pgferry dev token --user <uuid>)')
  process.exit(2)
}
const proxy = process.env.PROXY_URL ?? 'http://127.0.0.1:54351'
const columns = ['id', 'user_id', 'title', 'status', 'priority', 'tags', 'updated_at']

const pg = await PGlite.create({ dataDir: process.env.PGLITE_DIR || undefined, extensions: { electric: electricSync() } })
await pg.exec(`create table if not exists tasks (id uuid primary key, user_id uuid not null, title text not null,
                 status text not null, priority int4 not null, tags text[] not null, updated_at timestamptz not null)`)

let upToDate = false
const sync = await pg.electric.syncShapeToTable({
  shape: {
    url: `${proxy}/v1/shape`, // the proxy, never Electric directly: it scopes the shape to the token's user
    params: { table: 'tasks', columns },
    headers: { Authorization: `Bearer ${token}` },
  },
  table: 'tasks',
  primaryKey: ['id'],
  shapeKey: 'my-tasks', // offsets persist with the replica: a restart resumes instead of refetching
  onInitialSync: () => { upToDate = true },
  onError: (error) => {
    console.error(`sync failed: ${error?.status ?? ''} ${error?.message ?? error}`)
    process.exit(1)
  },
})

let shown = null
for (;;) {
  const { rows } = await pg.query('select id, user_id, title, status, priority, tags from tasks order by title')
  const text = JSON.stringify(rows)
  if (text !== shown && (upToDate || sync.isUpToDate)) {
    shown = text
    console.log(text)
    if (process.env.ONCE) {
      sync.unsubscribe()
      await pg.close()
      process.exit(0)
    }
  }
  await new Promise((resolve) => setTimeout(resolve, 200))
}
