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

test('after the link comes back, the open session is reported once, so its commands reach the new connection', async () => {
  // A sidecar that acknowledges everything, then drops the link: nothing is left to resend, and yet the connection
  // the runtime reaches next (perhaps another replica) must learn that the session is here.
  const acking = new WebSocketServer({ host: '127.0.0.1', port: 0 })
  await new Promise((resolve) => acking.once('listening', resolve))
  cleanups.push(() => new Promise((resolve) => acking.close(resolve)))
  const connections = []
  acking.on('connection', (socket) => {
    const frames = []
    connections.push(frames)
    socket.on('message', (data) => {
      const frame = JSON.parse(String(data))
      const items = Array.isArray(frame) ? frame : [frame]
      frames.push(...items)
      const upTo = Math.max(0, ...items.map((item) => item.seq ?? 0))
      if (upTo) socket.send(JSON.stringify({ type: 'events.ack', upTo }))
    })
  })
  const standIn = await startStandIn()
  cleanups.push(() => standIn.close())
  const device = await pairedDevice()
  let link
  const { sock } = await openSocket(standIn, device, {
    logger: quiet,
    onSocket: (s) => {
      link = attachSidecar(s, { organizationId: 1, organizationPhoneId: 4302, url: `ws://127.0.0.1:${acking.address().port}/v1/runtime`, token: TOKEN, logger: quiet, phoneJid: JID, reconnectInitialMs: 100, reconnectMaxMs: 300 })
    },
  })
  cleanups.push(async () => { link.detach(); sock.end(undefined) })
  await eventually(() => connections[0]?.some((item) => item.type === 'connection.update' && item.connection === 'open'), 'the open reported')
  await eventually(() => link.unacknowledged === 0, 'everything acknowledged')
  assert.ok(!connections[0].some((item) => item.type === 'activity'), 'no report of presence on the first connection')
  for (const client of acking.clients) client.terminate()
  await eventually(() => connections[1]?.some((item) => item.type === 'activity'), 'the session reported on the new connection')
  const [info, ...rest] = connections[1]
  assert.equal(info.type, 'runtime.info')
  const reports = rest.filter((item) => item.type === 'activity')
  assert.equal(reports.length, 1)
  assert.equal(reports[0].organizationPhoneId, 4302)
  assert.deepEqual([reports[0].messages, reports[0].receipts, reports[0].notifications], [0, 0, 0])
  for (const item of connections[1]) assert.ok(validateFrame(item), JSON.stringify(validateFrame.errors))
  assert.ok(!rest.some((item) => item.type === 'connection.update'), 'no open invented: the counters stay')
})
