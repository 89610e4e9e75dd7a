// A real PGlite database kept in sync with a shape by @electric-sql/pglite-sync, reporting as JSON lines.
//
// Config (argv[2] as JSON):
//   url       full shape URL, e.g. http://127.0.0.1:8123/v1/shape   (required)
//   dataDir   directory for the PGlite database; reuse it to test restart-resume (required)
//   table     remote table, default "public.tasks"
//   where, params   as for shape-stream.mjs                           (optional)
//   columns   remote columns to sync, default the local table's columns
//   shapeKey  key under which pglite-sync stores handle/offset, default "tasks"
//   headers   request headers                                         (optional)
//   secret    the sync server's secret, sent as the `secret` parameter (optional)
//
// The local table is `tasks (id uuid primary key, title text not null, status text, priority int)`.
//
// Events printed:
//   {"event":"request"|"response", ...}                 every HTTP exchange
//   {"event":"ready","resumeFrom":{handle,offset}|null} PGlite open; what pglite-sync will resume from
//   {"event":"initial-sync"}                            onInitialSync fired
//   {"event":"must-refetch"}                            onMustRefetch fired (the table is emptied)
//   {"event":"rows","rows":[...],"subscription":{...}}  local table contents, whenever they change (100 ms poll)
//   {"event":"error", ...}                              an error
//   {"event":"stopped","reason"}

import { PGlite } from '@electric-sql/pglite'
import { electricSync } from '@electric-sql/pglite-sync'
import { emit, loggingFetch, onStop, readConfig, reportUncaught } from './common.mjs'

reportUncaught()
const config = readConfig()
const columns = config.columns ?? ['id', 'title', 'status', 'priority']

const pg = await PGlite.create({ dataDir: config.dataDir, extensions: { electric: electricSync() } })
await pg.exec(`
  create table if not exists tasks (
    id uuid primary key,
    title text not null,
    status text,
    priority int
  );
`)

async function subscriptionState() {
  const exists = await pg.query(`select to_regclass('electric.subscriptions_metadata') is not null as ok`)
  if (!exists.rows[0].ok) return null
  const result = await pg.query(`select key, shape_metadata, last_lsn from electric.subscriptions_metadata`)
  return result.rows
}

const before = await subscriptionState()
const shapeKey = config.shapeKey ?? 'tasks'
const stored = before?.find((row) => row.key === shapeKey)
emit('ready', { resumeFrom: stored ? stored.shape_metadata.shape : null, lastLsn: stored?.last_lsn ?? null })

const shapeParams = { table: config.table ?? 'public.tasks', columns }
if (config.where) shapeParams.where = config.where
if (config.params) shapeParams.params = config.params
if (config.secret) shapeParams.secret = config.secret

const sync = await pg.electric.syncShapeToTable({
  shape: {
    url: config.url,
    params: shapeParams,
    headers: config.headers ?? {},
    fetchClient: loggingFetch(),
    backoffOptions: { initialDelay: 100, maxDelay: 1000, multiplier: 2 },
  },
  table: 'tasks',
  primaryKey: ['id'],
  shapeKey,
  initialInsertMethod: config.initialInsertMethod ?? 'insert',
  onInitialSync: () => emit('initial-sync'),
  onMustRefetch: async (tx) => {
    emit('must-refetch')
    await tx.exec('delete from tasks')
  },
  onError: (error) => emit('error', { message: String(error?.message ?? error), status: error?.status }),
})

let last = null
let stopped = false
async function poll() {
  if (stopped) return
  try {
    const result = await pg.query('select id, title, status, priority from tasks order by id')
    const snapshot = JSON.stringify(result.rows)
    if (snapshot !== last) {
      last = snapshot
      emit('rows', { rows: result.rows, subscription: await subscriptionState(), upToDate: sync.isUpToDate })
    }
  } catch (error) {
    emit('error', { where: 'poll', message: String(error?.message ?? error) })
  }
  if (!stopped) setTimeout(poll, 100)
}
poll()

onStop(async () => {
  stopped = true
  sync.unsubscribe()
  emit('final', { subscription: await subscriptionState() })
  await pg.close()
})
