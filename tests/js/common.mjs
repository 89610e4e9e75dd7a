// Shared helpers for the interop scripts: JSON-lines output, a logging fetch, stop-on-stdin.
//
// Every line a script prints on stdout is one JSON object with an `event` field; tests/test_sync_interop.py
// parses them. Anything else (warnings from the libraries) goes to stderr.

import process from 'node:process'
import readline from 'node:readline'

const ELECTRIC_HEADERS = [
  'electric-handle',
  'electric-offset',
  'electric-schema',
  'electric-cursor',
  'electric-up-to-date',
  'cache-control',
  'etag',
  'content-type',
]

// BigInt-safe JSON (int8 columns parse to BigInt).
export function toJson(value) {
  return JSON.stringify(value, (_key, v) => (typeof v === 'bigint' ? v.toString() : v))
}

// When the reader of stdout goes away (the test ended), there is nobody to report to: exit quietly instead of
// looping on EPIPE errors.
process.stdout.on('error', () => process.exit(0))

export function emit(event, fields = {}) {
  if (process.stdout.destroyed || !process.stdout.writable) process.exit(0)
  process.stdout.write(toJson({ event, ...fields }) + '\n')
}

// The config is one JSON object: argv[2], or the PGFERRY_INTEROP_CONFIG environment variable.
export function readConfig() {
  const raw = process.argv[2] ?? process.env.PGFERRY_INTEROP_CONFIG
  if (!raw) {
    throw new Error('usage: node <script>.mjs \'{"url": "http://127.0.0.1:PORT/v1/shape", ...}\'')
  }
  return JSON.parse(raw)
}

// A fetch that reports every request and the Electric headers of its response (status 409s included), so a
// failing test shows exactly what went over the wire.
export function loggingFetch() {
  let sequence = 0
  return async (input, init) => {
    const url = input instanceof Request ? input.url : String(input)
    const id = ++sequence
    emit('request', { id, url })
    let response
    try {
      response = await fetch(input, init)
    } catch (error) {
      emit('response', { id, url, error: String(error?.cause?.code ?? error?.message ?? error) })
      throw error
    }
    const headers = {}
    for (const name of ELECTRIC_HEADERS) {
      if (response.headers.has(name)) headers[name] = response.headers.get(name)
    }
    const fields = { id, url, status: response.status, headers }
    if (!response.ok) {
      // Keep the body readable for the client: clone before peeking.
      try {
        fields.body = await response.clone().text()
      } catch {
        fields.body = null
      }
    }
    emit('response', fields)
    return response
  }
}

// Calls `stop` once: on a line "stop" on stdin, on stdin EOF, or on SIGTERM/SIGINT.
export function onStop(stop) {
  let stopping = false
  const once = async (reason) => {
    if (stopping) return
    stopping = true
    try {
      await stop(reason)
    } catch (error) {
      emit('error', { where: 'stop', message: String(error?.stack ?? error) })
    }
    emit('stopped', { reason })
    process.exit(0)
  }
  const lines = readline.createInterface({ input: process.stdin })
  lines.on('line', (line) => {
    if (line.trim() === 'stop') once('stdin')
  })
  lines.on('close', () => once('eof'))
  process.on('SIGTERM', () => once('SIGTERM'))
  process.on('SIGINT', () => once('SIGINT'))
}

export function reportUncaught() {
  process.on('uncaughtException', (error) => {
    if (error?.code === 'EPIPE') process.exit(0)
    emit('error', { where: 'uncaughtException', message: String(error?.stack ?? error) })
  })
  process.on('unhandledRejection', (error) => {
    emit('error', { where: 'unhandledRejection', message: String(error?.stack ?? error) })
  })
}
