// The adapter on the real makeWASocket (7.0.0-rc14, on the loopback WhatsApp stand-in) across a sidecar that goes
// away before acknowledging: what it sent and did not see acknowledged (events.ack) is sent again, in order, to
// the real sidecar that takes its place on the same address, and the sidecar takes each event once.
import { test, after } from 'node:test'
import assert from 'node:assert/strict'
import { createRequire } from 'node:module'
import pino from 'pino'
import { cleanupsAfter, eventually, startSidecar, TOKEN } from './sidecar.mjs'
import { validateFrame } from './schema.mjs'
import { startStandIn, pairedDevice, openSocket } from './standin.mjs'

const require = createRequire(import.meta.url)
const { attachSidecar } = require('../index.cjs')
const { WebSocketServer } = require('ws')

const quiet = pino({ level: 'silent' })
const JID = '15550001111@s.whatsapp.net'
const cleanups = cleanupsAfter(after)

test('events a vanished sidecar never acknowledged reach its replacement once, after runtime.info', async () => {
  // A sidecar that says it acknowledges (upTo 0: nothing yet) and then vanishes with every event unacknowledged.
  const vanishing = new WebSocketServer({ host: '127.0.0.1', port: 0 })
  await new Promise((resolve) => vanishing.once('listening', resolve))
  const port = vanishing.address().port
  const seen = []
  vanishing.on('connection', (socket) => {
    socket.on('message', (data) => {
      const frame = JSON.parse(String(data))
      for (const item of Array.isArray(frame) ? frame : [frame]) {
        seen.push(item)
        if (item.type === 'runtime.info') socket.send(JSON.stringify({ type: 'events.ack', upTo: 0 }))
      }
    })
  })
  const standIn = await startStandIn()
  cleanups.push(() => standIn.close())
  const device = await pairedDevice()
  let link
  const { sock, conn } = await openSocket(standIn, device, {
    logger: quiet,
    onSocket: (s) => {
      link = attachSidecar(s, { organizationId: 1, organizationPhoneId: 4301, url: `ws://127.0.0.1:${port}/v1/runtime`, token: TOKEN, logger: quiet, activityIntervalMs: 100, phoneJid: JID, reconnectInitialMs: 100, reconnectMaxMs: 300 })
    },
  })
  cleanups.push(async () => { link.detach(); sock.end(undefined) })
  standIn.deliver(conn, 50) // inbound traffic: the adapter reports activity
  await eventually(() => seen.some((item) => item.type === 'activity'), 'activity sent to the vanishing sidecar')
  assert.equal(seen[0].type, 'runtime.info')
  for (const item of seen) assert.ok(validateFrame(item), JSON.stringify(validateFrame.errors))
  const open = seen.find((item) => item.type === 'connection.update' && item.connection === 'open')
  assert.ok(open && Number.isInteger(open.seq), 'the open carries its seq')
  for (const client of vanishing.clients) client.terminate()
  await new Promise((resolve) => vanishing.close(resolve))
  assert.ok(link.unacknowledged >= 2, `kept until acknowledged (${link.unacknowledged})`)

  const real = await startSidecar(port)
  cleanups.push(() => real.stop())
  await eventually(async () => {
    const body = await real.get('/v1/sessions?state=active').catch(() => null)
    return body?.sessions?.some((session) => session.organizationPhoneId === 4301 && session.connected)
  }, 'the open, resent, reached the real sidecar')
  await eventually(() => link.unacknowledged === 0 || link.unacknowledged < 3, 'the real sidecar acknowledged them')
  assert.ok(link.stats.resent >= 2)
  const opens = (await real.metrics()).split('\n').find((line) => line.startsWith('whatsapp_sidecar_events_total{channel="websocket",type="connection.update"}'))
  const updates = seen.filter((item) => item.type === 'connection.update').length // connecting, open: once each
  assert.equal(Number((opens ?? '').split(' ').pop()), updates, 'each resent connection.update taken once')
})
