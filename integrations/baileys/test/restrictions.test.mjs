// Restrictions and the runtime version, against the real makeWASocket (7.0.0-rc14) on the loopback stand-in and
// a real sidecar process. The stand-in sends what WhatsApp sends a restricted number: the reach-out time lock and
// message capping as mex notifications, acks refusing a message with 463 and 479, and <failure> closes (402
// temporary ban, 405 client outdated). Baileys turns them into its own events (connection.update
// reachoutTimeLock, message-capping.update, messages.update ERROR, a close with the status code); the adapter
// reports account.restriction, and the sidecar's timeline (GET /v1/restrictions) and gauges show them.
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { createRequire } from 'node:module'
import pino from 'pino'
import { eventually, startSidecar, TOKEN } from './sidecar.mjs'
import { checked } from './schema.mjs'
import { startStandIn, pairedDevice, openSocket } from './standin.mjs'

const require = createRequire(import.meta.url)
const { attachSidecar } = require('../index.cjs')
const BAILEYS_VERSION = require('@whiskeysockets/baileys/package.json').version

const quiet = pino({ level: 'silent' })
const JID = '15550001111@s.whatsapp.net'
const PEER = '15550002222@s.whatsapp.net'
const PHONE = 8301

let sidecar
let standIn
before(async () => {
  sidecar = await startSidecar(0, ['--session-metrics', 'all'])
  standIn = await startStandIn()
})
after(async () => {
  await standIn?.close()
  await sidecar?.stop()
})

// A backend as users write one: reconnects on every close except a logout (401).
function backend() {
  const state = { conn: null, sock: null, link: null, closes: [], stopped: false }
  const connect = async () => {
    const device = state.device ?? (state.device = await pairedDevice())
    const onSocket = (sock) => {
      state.link = attachSidecar(sock, { organizationId: 3, organizationPhoneId: PHONE, url: sidecar.ws, token: TOKEN, logger: quiet, phoneJid: JID })
      sock.ev.on('connection.update', ({ connection, lastDisconnect }) => {
        if (connection !== 'close') return
        const code = lastDisconnect?.error?.output?.statusCode
        state.closes.push(code)
        state.link.detach()
        if (code !== 401 && !state.stopped) setTimeout(connect, 50)
      })
    }
    const { sock, conn } = await openSocket(standIn, device, { logger: quiet, onSocket })
    Object.assign(state, { sock, conn })
  }
  state.start = connect
  state.stop = () => {
    state.stopped = true
    state.link?.detach()
    state.sock?.end(undefined)
  }
  return state
}

const inForce = async () => (await sidecar.get(`/v1/restrictions?active=true&organizationId=3`)).restrictions
const kinds = async () => (await inForce()).map((r) => r.kind).sort()
const history = async () => (await sidecar.get(`/v1/restrictions?active=false&organizationId=3`)).restrictions

async function gauge(name, labels) {
  const text = await sidecar.metrics()
  return text.split('\n').filter((l) => l.startsWith(`${name}{`) && labels.every((label) => l.includes(label))).map((l) => Number(l.split(' ').pop()))
}

test('restrictions from the real socket reach the timeline and lift again; runtime.info names the installed Baileys', async () => {
  const phone = backend()
  await phone.start()
  try {
    // Each connection opens with runtime.info: library and version from node_modules, the adapter's version.
    await eventually(async () => (await gauge('whatsapp_runtime_sessions', ['library="baileys"', `version="${BAILEYS_VERSION}"`]))[0] === 1,
      'the session counted under the installed Baileys version')

    // Reach-out time lock, set then lifted (NotificationUserReachoutTimelockUpdate).
    const ends = Math.floor(Date.now() / 1000) + 3600
    await standIn.mex(phone.conn, 'NotificationUserReachoutTimelockUpdate', {
      xwa2_notify_account_reachout_timelock: { is_active: true, time_enforcement_ends: String(ends), enforcement_type: 'BIZ_QUALITY' },
    })
    const lock = await eventually(async () => (await inForce()).find((r) => r.kind === 'reachout_timelock'), 'the time lock in force')
    assert.equal(Date.parse(lock.until), ends * 1000)
    assert.equal(lock.detail, 'BIZ_QUALITY')
    assert.equal(lock.organizationPhoneId, PHONE)
    assert.deepEqual(await gauge('whatsapp_session_restricted', [`organization_phone_id="${PHONE}"`, 'kind="reachout_timelock"']), [1])
    await standIn.mex(phone.conn, 'NotificationUserReachoutTimelockUpdate', { xwa2_notify_account_reachout_timelock: { is_active: false } })
    await eventually(async () => !(await kinds()).includes('reachout_timelock'), 'the time lock lifted')
    assert.deepEqual(await gauge('whatsapp_session_restricted', ['kind="reachout_timelock"']), [])

    // Message capping (MessageCappingInfoNotification): capped, then not.
    const cycleEnd = Math.floor(Date.now() / 1000) + 86_400
    await standIn.mex(phone.conn, 'MessageCappingInfoNotification', {
      xwa2_notify_new_chat_messages_capping_info_update: { capping_status: 'CAPPED', total_quota: 250, used_quota: 250, cycle_end_timestamp: String(cycleEnd) },
    })
    const cap = await eventually(async () => (await inForce()).find((r) => r.kind === 'message_cap'), 'the message cap in force')
    assert.equal(Date.parse(cap.until), cycleEnd * 1000)
    assert.match(cap.detail, /CAPPED 250\/250/)
    await standIn.mex(phone.conn, 'MessageCappingInfoNotification', { xwa2_notify_new_chat_messages_capping_info_update: { capping_status: 'NONE' } })
    await eventually(async () => !(await kinds()).includes('message_cap'), 'the message cap lifted')

    // Acks refusing our messages: 479 (smax-invalid) and 463 (restricted, missing tctoken).
    await standIn.refuse(phone.conn, { id: '3EB0A479', to: PEER, error: 479 })
    await standIn.refuse(phone.conn, { id: '3EB0A463', to: PEER, error: 463 })
    await eventually(async () => (await kinds()).join() === 'ack_463,ack_479', 'both refusals in force')
    const refused = await inForce()
    assert.deepEqual(refused.map((r) => r.code).sort(), [463, 479])
    assert.equal(refused.find((r) => r.kind === 'ack_463').detail, 'Your account has been restricted') // Baileys' own text
    for (const r of refused) assert.ok(Date.parse(r.until) > Date.now() + 3_000_000, 'held for about an hour after the refusal')

    // A temporary ban closes the connection (<failure reason=402 expire=…>); the reconnect that opens lifts it.
    const sockets = phone.closes.length
    const banned = phone.conn
    await standIn.fail(banned, 402, { code: '101', expire: '7200' })
    const ban = await eventually(async () => (await history()).find((r) => r.kind === 'temporary_ban' && r.active), 'the ban recorded')
    assert.equal(ban.code, 402)
    assert.ok(Math.abs(Date.parse(ban.until) - (Date.now() + 7_200_000)) < 60_000, `until about two hours away: ${ban.until}`)
    assert.equal(phone.closes[sockets], 402)
    await eventually(async () => (await history()).some((r) => r.kind === 'temporary_ban' && !r.active), 'lifted by the reconnect that opened')
    assert.ok(!(await kinds()).includes('temporary_ban'))

    // 405: the client version refused; again lifted once a connection opens.
    await eventually(() => phone.conn !== banned && !phone.conn.closed, 'the backend reconnected')
    await standIn.fail(phone.conn, 405)
    await eventually(async () => (await history()).some((r) => r.kind === 'client_outdated' && r.active && r.code === 405), 'client_outdated recorded')
    await eventually(async () => (await history()).some((r) => r.kind === 'client_outdated' && !r.active), 'client_outdated lifted')

    // Restrictions never close a session: the phone is still open, nothing logged it out.
    const session = await sidecar.get(`/v1/sessions/${PHONE}`)
    assert.equal(session.state, 'active')
    assert.deepEqual(sidecar.decisions('logout'), [])
    assert.ok(!phone.closes.includes(401))
    // One history row per change: each kind started once and (where lifted) lifted once.
    const rows = await history()
    for (const kind of ['reachout_timelock', 'message_cap', 'temporary_ban', 'client_outdated']) {
      assert.deepEqual(rows.filter((r) => r.kind === kind).map((r) => r.active).sort(), [false, true], kind)
    }
  } finally {
    phone.stop()
  }
})

test('every frame matched the runtime link schema', () => {
  assert.ok(checked.frames > 0)
  assert.deepEqual(checked.violations, [])
})
