// A browser-style client for examples/offline_sync.py: PGlite + @electric-sql/pglite-sync reading through the
// pgferry proxy, writing through its write API (POST /v1/mutations: the "official client plus the write API"
// pattern), and waiting until its replica holds EXPECT_ROWS rows that stopped changing.
//
// Environment: TOKEN (access token), PROXY_URL, TASK_ID (a task to edit), EXPECT_ROWS, RUN (a tag for titles).
// Prints one JSON line {"event": "final", "rows": [...]} (or {"event": "error", ...} and exits 1).
import { PGlite } from '@electric-sql/pglite'
import { electricSync } from '@electric-sql/pglite-sync'
import { randomUUID } from 'node:crypto'

const { TOKEN: token, PROXY_URL: proxy, TASK_ID: taskId, RUN: run } = process.env
const expected = Number(process.env.EXPECT_ROWS)
const fail = (message) => {
  console.log(JSON.stringify({ event: 'error', message }))
  process.exit(1)
}

const pg = await PGlite.create({ extensions: { electric: electricSync() } })
await pg.exec(`create table tasks (id uuid primary key, user_id uuid not null, title text not null,
               status text not null, priority int4 not null)`)
let upToDate = false
const sync = await pg.electric.syncShapeToTable({
  shape: {
    url: `${proxy}/v1/shape`,
    params: { table: 'tasks', columns: ['id', 'user_id', 'title', 'status', 'priority'] },
    headers: { Authorization: `Bearer ${token}` },
  },
  table: 'tasks',
  primaryKey: ['id'],
  shapeKey: null,
  onInitialSync: () => { upToDate = true },
  onError: (error) => fail(`sync failed: ${error?.status ?? ''} ${error?.message ?? error}`),
})
const deadline = Date.now() + 60_000
while (!upToDate && !sync.isUpToDate) {
  if (Date.now() > deadline) fail('never up to date')
  await new Promise((resolve) => setTimeout(resolve, 50))
}

const response = await fetch(`${proxy}/v1/mutations`, {
  method: 'POST',
  headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/json' },
  body: JSON.stringify({
    mutations: [
      { id: randomUUID(), op: 'insert', table: 'public.tasks', row: { id: randomUUID(), title: `${run}: from pglite` } },
      { id: randomUUID(), op: 'update', table: 'public.tasks', row: { id: taskId, status: 'queued' }, written_at: Date.now() },
    ],
  }),
})
if (response.status !== 200) fail(`write API answered ${response.status}: ${await response.text()}`)
const { txid } = await response.json()

let last = null
let stableSince = Date.now()
while (Date.now() < deadline) {
  const { rows } = await pg.query('select id, title, status, priority from tasks order by id')
  const text = JSON.stringify(rows)
  if (text !== last) {
    last = text
    stableSince = Date.now()
  } else if (rows.length === expected && Date.now() - stableSince > 3000) {
    console.log(JSON.stringify({ event: 'final', txid, rows }))
    sync.unsubscribe()
    await pg.close()
    process.exit(0)
  }
  await new Promise((resolve) => setTimeout(resolve, 100))
}
fail(`replica never settled at ${expected} rows: ${last}`)
