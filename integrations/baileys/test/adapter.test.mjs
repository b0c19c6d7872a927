// The adapter against the real @whiskeysockets/baileys (7.0.0-rc14) and a real sidecar process.
// Errors are genuine: two real Signal parties built with Baileys' libsignal repository, a tampered message
// decrypted by Baileys' own decryptMessageNode, which yields the CIPHERTEXT stub a live socket upserts.
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { createRequire } from 'node:module'
import fs from 'node:fs'
import path from 'node:path'
import * as B from '@whiskeysockets/baileys'
import pino from 'pino'
import { eventually, startSidecar, REPO, TOKEN } from './sidecar.mjs'
import { checked, validateFrame } from './schema.mjs'
import { memStore } from './memstore.mjs'
import { party, badMacStubs } from './signal.mjs'

const require = createRequire(import.meta.url)
const { attachSidecar, sidecarLogger, appStateFailure } = require('../index.cjs')
const NodeCache = require('@cacheable/node-cache').default ?? require('@cacheable/node-cache')

const quiet = pino({ level: 'silent' })

// A socket-shaped object: Baileys' real event emitter, auth state, and end() that reports the close the way
// makeWASocket does (connection.update close with lastDisconnect).
function socketShaped(jid, keys) {
  const ev = B.makeEventBuffer(quiet)
  const off = ev.off.bind(ev)
  const sock = {
    ev,
    removed: [],
    user: { id: jid },
    authState: { creds: { me: { id: jid }, myAppStateKeyId: 'AAAAAFBQ' }, keys },
    ended: null,
    end(error) {
      sock.ended = error
      ev.emit('connection.update', { connection: 'close', lastDisconnect: { error, date: new Date() } })
    },
  }
  ev.off = (name, listener) => {
    sock.removed.push(name)
    return off(name, listener)
  }
  return sock
}

// Every frame the adapter sends, decoded (the adapter and the test share the `ws` module).
const WebSocketSpy = {
  capture(into) {
    const WebSocket = require('ws')
    const original = WebSocket.prototype.send
    WebSocket.prototype.send = function (data, ...rest) {
      try {
        into.push(...[].concat(JSON.parse(String(data))))
      } catch {}
      return original.call(this, data, ...rest)
    }
    return { restore: () => { WebSocket.prototype.send = original } }
  },
}

let sidecar
before(async () => { sidecar = await startSidecar() })
after(async () => { await sidecar?.stop() })

test('three genuine Bad MAC stubs end the session with a loggedOut close the backend does not undo', async () => {
  const me = party('79001110010@s.whatsapp.net')
  const stubs = await badMacStubs(me, 3)
  assert.equal(stubs[0].messageStubType, B.proto.WebMessageInfo.StubType.CIPHERTEXT)
  assert.match(stubs[0].messageStubParameters[0], /Bad MAC/)
  const sock = socketShaped(me.jid, memStore().keys)
  let reconnects = 0
  // The usual backend branch: reconnect unless logged out.
  sock.ev.on('connection.update', ({ connection, lastDisconnect }) => {
    if (connection === 'close' && lastDisconnect?.error?.output?.statusCode !== B.DisconnectReason.loggedOut) reconnects++
  })
  const link = attachSidecar(sock, { organizationId: 7, organizationPhoneId: 4201, url: sidecar.ws, token: TOKEN, logger: quiet })
  await eventually(() => link.connected, 'link connected')
  sock.ev.emit('connection.update', { connection: 'open' })
  sock.ev.emit('messages.upsert', { messages: [stubs[0]], type: 'notify' })
  const after1 = await eventually(async () => {
    const stats = await sidecar.get('/v1/sessions/4201/stats')
    return stats.badMacErrors === 1 && stats
  }, 'first Bad MAC counted')
  assert.equal(after1.isHealthy, true)
  sock.ev.emit('messages.upsert', { messages: [stubs[0]], type: 'append' }) // the same stub again: not a new fault
  sock.ev.emit('messages.upsert', { messages: [stubs[1], stubs[2]], type: 'notify' })
  await eventually(() => sock.ended, 'session.end obeyed')
  assert.equal(sock.ended.output.statusCode, B.DisconnectReason.loggedOut)
  assert.equal(reconnects, 0, 'the backend did not reconnect after the sidecar logout')
  const closure = await eventually(() => {
    const file = path.join(sidecar.stateDir, 'closures.jsonl')
    const line = fs.existsSync(file) && fs.readFileSync(file, 'utf8').split('\n').find((l) => l.includes('"organizationPhoneId":4201'))
    return line && JSON.parse(line)
  }, 'closure recorded')
  assert.equal(closure.reason, 'bad_mac_limit')
  assert.equal(closure.badMacErrors, 3, 'the duplicate stub was not counted')
  assert.equal(closure.socket, 'ended', 'the runtime acked the session.end')
  const metrics = await sidecar.metrics()
  assert.match(metrics, /whatsapp_session_closes_total\{organization_id="7",reason="bad_mac_limit"\} 1\.0|whatsapp_session_closes_total\{reason="bad_mac_limit",organization_id="7"\} 1\.0/)
  assert.deepEqual(sock.removed.sort(), ['connection.update', 'message-capping.update', 'messages.update', 'messages.upsert'], 'the adapter removed its listeners')
})

test('an app-state bad decrypt logged by Baileys makes the sidecar heal: cached app-state keys are dropped', async () => {
  const base = memStore()
  const cache = new NodeCache({ stdTTL: 300, useClones: false })
  const keys = B.makeCacheableSignalKeyStore(base.keys, quiet, cache)
  await keys.set({
    'app-state-sync-key': { AAAAAFBQ: { keyData: Buffer.alloc(32, 1), timestamp: 1 } },
    'app-state-sync-version': { regular_high: { version: 2, hash: Buffer.alloc(128), indexValueMap: {} } },
    session: { '15550002222.0': Buffer.from('session') },
  })
  await keys.get('app-state-sync-key', ['AAAAAFBQ']) // cached now
  const logger = sidecarLogger(quiet)
  const sock = socketShaped('79001110011@s.whatsapp.net', keys)
  const link = attachSidecar(sock, { organizationId: 7, organizationPhoneId: 4202, url: sidecar.ws, token: TOKEN, logger, keyCache: cache })
  await eventually(() => link.connected, 'link connected')
  sock.ev.emit('connection.update', { connection: 'open' })
  // Baileys 6.x logs a failed app-state sync at info level with the OpenSSL error's stack; this one is genuine.
  let opensslError
  try {
    B.aesDecrypt(B.aesEncrypt(Buffer.from('{"index":["mute"]}'), Buffer.alloc(32, 1)), Buffer.alloc(32, 2))
  } catch (error) {
    opensslError = error
  }
  assert.equal(opensslError?.code, 'ERR_OSSL_BAD_DECRYPT')
  const child = logger.child({ class: 'baileys' })
  child.info({ name: 'regular_high', error: opensslError.stack }, 'failed to sync state from version, removing and trying from scratch')
  child.info({ name: 'regular_high', error: opensslError.stack }, 'failed to sync state from version') // same failure, given up
  await eventually(async () => (await sidecar.get('/v1/sessions/4202/stats')).badDecryptErrors === 1, 'one bad decrypt counted')
  await eventually(async () => (await cache.keys()).every((k) => !k.startsWith('app-state-sync-')), 'cache purged')
  assert.ok((await cache.keys()).includes('session.15550002222.0'), 'other cached keys stay')
  await eventually(() => !base.data['app-state-sync-key']?.AAAAAFBQ && !base.data['app-state-sync-version']?.regular_high, 'store purged')
  assert.ok(base.data.session['15550002222.0'], 'peer sessions stay')
  assert.equal(sock.ended, null, 'the session stays up')
  link.detach()
})

test('the golden Baileys lines: app-state failures are recognised, everything else is not', () => {
  const golden = fs.readFileSync(path.join(REPO, 'tests', 'fixtures', 'baileys', 'golden_lines.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l))
  const recognised = golden.filter((g) => appStateFailure(g.line)).map((g) => g.label).sort()
  assert.deepEqual(recognised, ['appstate.bad_decrypt_giving_up', 'appstate.bad_decrypt_retrying', 'appstate.invalid_patch_mac_skipped', 'appstate.missing_key_parked'])
  assert.equal(appStateFailure(golden.find((g) => g.label === 'appstate.missing_key_parked').line).kind, 'missing_key')
})

test('with the sidecar away the backend is unaffected; events wait and arrive once it is up', async () => {
  const probe = await startSidecar()
  const port = Number(new URL(probe.base).port)
  await probe.stop()
  const sock = socketShaped('79001110012@s.whatsapp.net', memStore().keys)
  const link = attachSidecar(sock, { organizationId: 8, organizationPhoneId: 4203, url: `ws://127.0.0.1:${port}/v1/runtime`, token: TOKEN, logger: quiet, reconnectInitialMs: 100, reconnectMaxMs: 300 })
  sock.ev.emit('connection.update', { connection: 'open' })
  const [stub] = await badMacStubs(party('79001110013@s.whatsapp.net'), 1)
  sock.ev.emit('messages.upsert', { messages: [stub], type: 'notify' })
  await new Promise((resolve) => setTimeout(resolve, 300))
  assert.equal(link.connected, false)
  assert.equal(link.buffered, 2, 'both events wait in the bounded buffer')
  const late = await startSidecar(port)
  try {
    await eventually(async () => {
      const response = await fetch(late.base + '/v1/sessions/4203/stats').catch(() => null)
      return response?.status === 200 && (await response.json()).badMacErrors === 1
    }, 'buffered events delivered after the sidecar came up')
    assert.ok(link.stats.connects >= 1)
  } finally {
    link.detach()
    await late.stop()
  }
})

test('a QR pairing makes the next open a new login, on the socket Baileys restarts to', async () => {
  const jid = '79001110014@s.whatsapp.net'
  const first = socketShaped(jid, memStore().keys)
  const before = attachSidecar(first, { organizationId: 9, organizationPhoneId: 4204, url: sidecar.ws, token: TOKEN, logger: quiet })
  await eventually(() => before.connected, 'link connected')
  first.ev.emit('connection.update', { qr: '2@abc' })
  first.ev.emit('connection.update', { isNewLogin: true })
  first.ev.emit('connection.update', { connection: 'close', lastDisconnect: { error: { output: { statusCode: 515 } } } })
  before.detach()
  const second = socketShaped(jid, memStore().keys)
  const sent = []
  const after = attachSidecar(second, { organizationId: 9, organizationPhoneId: 4204, url: sidecar.ws, token: TOKEN, logger: quiet })
  const send = WebSocketSpy.capture(sent)
  await eventually(() => after.connected, 'link connected')
  second.ev.emit('connection.update', { connection: 'open' })
  second.ev.emit('connection.update', { connection: 'close' })
  second.ev.emit('connection.update', { connection: 'open' })
  await eventually(() => sent.filter((e) => e.connection === 'open').length === 2, 'both opens sent')
  const opens = sent.filter((e) => e.connection === 'open')
  assert.equal(opens[0].isNewLogin, true, 'the open after pairing is a new login')
  assert.equal(opens[1].isNewLogin, undefined, 'a later reconnect is not')
  send.restore()
  after.detach()
})

test('every frame the adapter sent and every command it got match the runtime link\'s JSON Schema', () => {
  assert.ok(checked.frames > 0, 'the tests above sent frames through the adapter')
  assert.ok(checked.commands > 0, 'and received commands')
  assert.deepEqual(checked.violations, [])
  // The schema can refuse: a key of the adapter's own, a bad type, a missing field.
  const good = { type: 'decrypt.error', organizationId: 7, organizationPhoneId: 42, phoneJid: '79001112233@s.whatsapp.net', error: 'Bad MAC' }
  assert.ok(validateFrame(good) && validateFrame([good, good]))
  assert.ok(!validateFrame({ ...good, extra: 1 }))
  assert.ok(!validateFrame({ ...good, organizationPhoneId: '42' }))
  assert.ok(!validateFrame({ ...good, error: undefined }))
})

test('what the sidecar took but never acknowledged is sent again after a reconnect, with runtime.info first', async () => {
  // A stand-in sidecar that acknowledges the first event and drops the link before acknowledging the second.
  const { WebSocketServer } = require('ws')
  const standIn = new WebSocketServer({ host: '127.0.0.1', port: 0 })
  await new Promise((resolve) => standIn.once('listening', resolve))
  const port = standIn.address().port
  const seen = []
  standIn.on('connection', (socket) => {
    socket.on('message', (data) => {
      const frame = JSON.parse(String(data))
      for (const item of Array.isArray(frame) ? frame : [frame]) {
        seen.push(item)
        if (item.type === 'connection.update') socket.send(JSON.stringify({ type: 'events.ack', upTo: item.seq }))
        if (item.type === 'decrypt.error') socket.terminate()
      }
    })
  })
  const sock = socketShaped('79001110014@s.whatsapp.net', memStore().keys)
  const link = attachSidecar(sock, { organizationId: 8, organizationPhoneId: 4204, url: `ws://127.0.0.1:${port}/v1/runtime`, token: TOKEN, logger: quiet, reconnectInitialMs: 100, reconnectMaxMs: 300 })
  sock.ev.emit('connection.update', { connection: 'open' })
  const [stub] = await badMacStubs(party('79001110015@s.whatsapp.net'), 1)
  await eventually(() => seen.some((item) => item.type === 'events.ack' || item.type === 'connection.update'), 'the open taken')
  sock.ev.emit('messages.upsert', { messages: [stub], type: 'notify' })
  await eventually(() => seen.some((item) => item.type === 'decrypt.error'), 'the Bad MAC sent to the stand-in')
  assert.equal(seen[0].type, 'runtime.info')
  assert.equal(seen[0].runtimeId, link.runtimeId)
  for (const item of seen) assert.ok(validateFrame(item), JSON.stringify(validateFrame.errors))
  await new Promise((resolve) => standIn.close(resolve))
  const real = await startSidecar(port)
  try {
    await eventually(async () => {
      const response = await fetch(real.base + '/v1/sessions/4204/stats').catch(() => null)
      return response?.status === 200 && (await response.json()).badMacErrors === 1
    }, 'the unacknowledged Bad MAC resent to the real sidecar')
    await eventually(() => link.unacknowledged === 0, 'the real sidecar acknowledged it')
    assert.equal(link.stats.resent, 1)
  } finally {
    link.detach()
    await real.stop()
  }
})
