// A real @electric-sql/client ShapeStream + Shape against a shape endpoint, reporting as JSON lines.
//
// Config (argv[2] as JSON):
//   url      full shape URL, e.g. http://127.0.0.1:8123/v1/shape            (required)
//   table    "tasks" or "public.tasks"                                      (optional: a proxy may fix it)
//   where    SQL where clause with $1, $2 ...                                (optional)
//   params   array of strings for $1, $2 ... (sent as params[1]=...)         (optional)
//   columns  array of column names (sent quoted: "id","title")              (optional)
//   replica  "default" | "full"                                              (optional)
//   headers  object of request headers, e.g. {"Authorization": "Bearer x"} (optional)
//   offset, handle   resume a stream from a stored position                 (optional)
//   log      "full" | "changes_only"                                         (optional)
//   secret   the sync server's secret, sent as the `secret` parameter          (optional)
//   liveSse  true: follow live changes over server-sent events (live_sse)   (optional)
//
// Events printed (one JSON object per line):
//   {"event":"request"|"response", ...}          every HTTP exchange (see common.mjs)
//   {"event":"batch","messages":[...],"offset","handle"}   every batch the stream delivers
//   {"event":"must-refetch","handle"}             the stream was told to start over (409)
//   {"event":"rows","rows":[...],"offset","handle","upToDate":true}  after each up-to-date: shape.currentRows
//   {"event":"error","message","status"?,"json"?}  a stream error (the stream stops on 4xx other than 409)
//   {"event":"stopped","reason"}                  after "stop" on stdin / EOF / SIGTERM
// The last "rows" event carries the offset+handle to resume from in a new process.

import { Shape, ShapeStream, isChangeMessage, isControlMessage } from '@electric-sql/client'
import { emit, loggingFetch, onStop, readConfig, reportUncaught } from './common.mjs'

reportUncaught()
const config = readConfig()

const params = {}
for (const name of ['table', 'where', 'params', 'columns', 'replica', 'secret']) {
  if (config[name] !== undefined && config[name] !== null) params[name] = config[name]
}

const aborter = new AbortController()
const options = {
  url: config.url,
  params,
  headers: config.headers ?? {},
  signal: aborter.signal,
  fetchClient: loggingFetch(),
  // Fail fast enough for tests but keep retrying through a server restart.
  backoffOptions: { initialDelay: 100, maxDelay: 1000, multiplier: 2 },
  onError: (error) => {
    emit('error', {
      message: String(error?.message ?? error),
      status: error?.status,
      json: error?.json,
      text: error?.text,
    })
    // Returning nothing stops the stream; the test decides what an error means.
  },
}
if (config.offset !== undefined) options.offset = config.offset
if (config.handle !== undefined) options.handle = config.handle
if (config.log !== undefined) options.log = config.log
if (config.liveSse) options.liveSse = true

const stream = new ShapeStream(options)
// Shape subscribes first, so by the time our subscriber runs it has applied the batch.
const shape = new Shape(stream)

stream.subscribe(
  (messages) => {
    emit('batch', { messages, offset: stream.lastOffset, handle: stream.shapeHandle })
    for (const message of messages) {
      if (isControlMessage(message) && message.headers.control === 'must-refetch') {
        emit('must-refetch', { handle: stream.shapeHandle })
      }
    }
    const upToDate = messages.some((m) => isControlMessage(m) && m.headers.control === 'up-to-date')
    if (upToDate) {
      const rows = shape.currentRows
      emit('rows', {
        rows,
        keys: [...shape.currentValue.keys()],
        offset: stream.lastOffset,
        handle: stream.shapeHandle,
        upToDate: true,
        changes: messages.filter(isChangeMessage).length,
      })
    }
  },
  (error) => emit('error', { where: 'subscriber', message: String(error?.message ?? error), status: error?.status })
)

onStop(async () => {
  emit('position', { offset: stream.lastOffset, handle: stream.shapeHandle })
  aborter.abort()
})
emit('started', { options: { ...options, fetchClient: undefined, signal: undefined, onError: undefined } })
