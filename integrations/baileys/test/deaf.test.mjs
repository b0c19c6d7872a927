// Deaf sessions against the real makeWASocket (7.0.0-rc14) on the loopback stand-in: the stand-in delivers
// receipts, then stops delivering on one connection while still answering every query (keep-alive pings too).
// The sidecar (real process, small thresholds) probes, finds it deaf, restarts it with session.restart; the
// backend's usual "reconnect unless logged out" branch reconnects; traffic flows again and it is recovered.
// An idle session over the same period is never probed. session.probe measures a real round trip and fails
// when the stand-in stops answering.
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { createRequire } from 'node:module'
import pino from 'pino'
import { eventually, startSidecar, TOKEN } from './sidecar.mjs'
import { checked } from './schema.mjs'
import { startStandIn, pairedDevice, openSocket } from './standin.mjs'

const require = createRequire(import.meta.url)
const { attachSidecar } = require('../index.cjs')

const quiet = pino({ level: 'silent' })
const JID = '15550001111@s.whatsapp.net'
const FLOOR_SECONDS = 1.5
const CONFIRM_SECONDS = 1
const LIVENESS = [
  '--deaf-action', 'restart', '--deaf-floor', `${FLOOR_SECONDS}s`, '--deaf-gap-factor', '2',
  '--deaf-confirm', `${CONFIRM_SECONDS}s`, '--deaf-min-reports', '3', '--deaf-min-history', '0.5s', '--liveness-tick', '0.1',
  '--session-metrics', 'all', // the busy session's traffic is read from its own series while it is healthy and idle
]

let sidecar
let standIn
before(async () => {
  sidecar = await startSidecar(0, LIVENESS)
  standIn = await startStandIn()
})
after(async () => {
  await standIn?.close()
  await sidecar?.stop()
})

// A backend as users write one: one socket per phone, reconnected on every close except a logout (401).
function backend(phoneId, { deliver = true } = {}) {
  const state = { sockets: 0, conns: [], closes: [], stopped: false, sock: null, link: null }
  const connect = async () => {
    const device = state.device ?? (state.device = await pairedDevice())
    const onSocket = (sock) => {
      state.link = attachSidecar(sock, { organizationId: 1, organizationPhoneId: phoneId, url: sidecar.ws, token: TOKEN, logger: quiet, activityIntervalMs: 200, phoneJid: JID })
      sock.ev.on('connection.update', ({ connection, lastDisconnect }) => {
        if (connection !== 'close') return
        const code = lastDisconnect?.error?.output?.statusCode
        state.closes.push(code)
        if (code !== 401 && !state.stopped) setTimeout(connect, 50)
      })
    }
    const { sock, conn } = await openSocket(standIn, device, { logger: quiet, onSocket })
    state.sockets++
    state.conns.push(conn)
    state.sock = sock
    if (deliver) standIn.deliver(conn, 100)
  }
  state.start = connect
  state.stop = () => {
    state.stopped = true
    state.link?.detach()
    state.sock?.end(undefined)
    state.sock?.ev.flush()
  }
  return state
}

async function counted(name, labels = '') {
  const text = await sidecar.metrics()
  const line = text.split('\n').find((l) => l.startsWith(`${name}${labels} `) || l.startsWith(`${name}{${labels}`))
  return line ? Number(line.split(' ').pop()) : 0
}

test('a session that stops receiving while answering pings is found deaf, restarted, and recovers; an idle one is never flagged', async () => {
  const busy = backend(8101)
  const idle = backend(8102, { deliver: false })
  await busy.start()
  await idle.start()
  try {
    await eventually(async () => (await counted('whatsapp_session_last_inbound_timestamp_seconds', 'organization_id="1",organization_phone_id="8101"')) > 0, 'traffic reported')
    // A baseline: the sidecar needs 3 reports with traffic; wait for 5 to arrive (the metric counts all phones').
    await eventually(async () => (await counted('whatsapp_sidecar_events_total', 'channel="websocket",type="activity"')) >= 5, `a baseline (sockets ${busy.sockets}, closes ${busy.closes}, buffered ${busy.link?.buffered}, connected ${busy.link?.connected}, stats ${JSON.stringify(busy.link?.stats)})`)
    const silencedAt = Date.now()
    busy.conns[0].deaf = true // pings and queries are still answered
    await eventually(() => busy.closes.includes(515), 'the deaf socket restarted with 515', 20_000)
    const detectedAfter = (Date.now() - silencedAt) / 1000
    await eventually(() => busy.sockets === 2, 'the backend reconnected')
    await eventually(() => sidecar.decisions('session.deaf_recovered').length === 1, 'recovered once traffic flows', 20_000)
    assert.ok(detectedAfter > FLOOR_SECONDS && detectedAfter < FLOOR_SECONDS + CONFIRM_SECONDS + 3, `detected after ${detectedAfter} s`)
    assert.ok(busy.conns[0].privacyQueries >= 1, 'the deaf session was probed with a real round trip first')
    const deaf = sidecar.decisions('deaf')
    assert.deepEqual(deaf.map((d) => d.organizationPhoneId), [8101])
    assert.equal(deaf[0].detail.why, 'silent past a successful probe')
    assert.ok(deaf[0].detail.probeRoundTripMs > 0)
    assert.equal(sidecar.decisions('session.restarted')[0].detail.socket, 'restarted')
    assert.equal(idle.conns[0].privacyQueries, 0, 'the idle session was never probed')
    assert.deepEqual(idle.closes, [], 'nor restarted')
    assert.ok(!busy.closes.includes(401), 'never a logout')
    assert.equal(await counted('whatsapp_session_incidents_total', 'kind="deaf"'), 1)
  } finally {
    busy.stop()
    idle.stop()
  }
})

test('session.probe measures a real round trip, and fails when the stand-in stops answering', async () => {
  const phone = backend(8103)
  await phone.start()
  try {
    await eventually(async () => (await sidecar.post('/v1/sessions/8103/probe')).status === 200, 'the session is held by a link')
    const before = phone.conns[0].privacyQueries
    const answered = await sidecar.post('/v1/sessions/8103/probe')
    assert.equal(answered.body.ok, true)
    assert.ok(answered.body.roundTripMs > 0 && answered.body.roundTripMs < 4000, JSON.stringify(answered.body))
    assert.equal(phone.conns[0].privacyQueries, before + 1, 'one privacy query reached the server')
    phone.conns[0].mute = true
    const failed = await sidecar.post('/v1/sessions/8103/probe')
    assert.equal(failed.body.ok, false, JSON.stringify(failed.body))
  } finally {
    phone.stop()
  }
})

test('every frame sent here matched the runtime link\'s JSON Schema', () => {
  assert.ok(checked.frames > 0)
  assert.deepEqual(checked.violations, [])
})
