// --key-store runtime: the real makeWASocket (7.0.0-rc14) on the loopback stand-in, its keys in the backend's own
// store wrapped by recordingKeyStore, and a real sidecar process. A genuine Bad MAC heals only the failing peer's
// session through the store's own set(... null); an operator's close deletes everything of the phone, creds too,
// and the closure's keysDeleted is what the adapter deleted. Once with useMultiFileAuthState in a temporary folder
// (read back from the file system), once with a store over a real redis-server (read back with redis-cli).
import { test, after } from 'node:test'
import assert from 'node:assert/strict'
import { spawn, spawnSync } from 'node:child_process'
import { createRequire } from 'node:module'
import fs from 'node:fs'
import net from 'node:net'
import os from 'node:os'
import path from 'node:path'
import * as B from '@whiskeysockets/baileys'
import pino from 'pino'
import { cleanupsAfter, eventually, startSidecar, TOKEN } from './sidecar.mjs'
import { validateFrame } from './schema.mjs'
import { party, badMacStubs } from './signal.mjs'
import { startStandIn, pairedDevice, openSocket, appStateKey, APP_KEY_ID } from './standin.mjs'

const require = createRequire(import.meta.url)
const { attachSidecar, recordingKeyStore } = require('../index.cjs')
const Redis = require('ioredis')

const quiet = pino({ level: 'silent' })
const JID = '15550001111@s.whatsapp.net'
const cleanups = cleanupsAfter(after)

let sidecar
let standIn
async function setUp() {
  if (!sidecar) {
    sidecar = await startSidecar(0, ['--key-store', 'runtime'])
    cleanups.push(() => sidecar.stop())
    standIn = await startStandIn()
    cleanups.push(() => standIn.close())
  }
}

// The keys a backend has before the sidecar acts: two peers' sessions, an app-state key and version, a pre-key.
const SEEDED = {
  session: { '15550000100.0': Buffer.from('failing peer'), '15550003333.0': Buffer.from('another peer') },
  'app-state-sync-key': { [APP_KEY_ID]: appStateKey(1) },
  'app-state-sync-version': { regular_high: { version: 2, hash: Buffer.alloc(128), indexValueMap: {} } },
  'pre-key': { 900: { public: Buffer.alloc(32, 1), private: Buffer.alloc(32, 2) } },
}

async function heal_then_close({ organizationPhoneId, keys, removeCreds, present }) {
  await setUp()
  const device = await pairedDevice()
  const recorder = recordingKeyStore(keys)
  await recorder.set(SEEDED)
  let link
  const { sock } = await openSocket(standIn, { creds: device.creds, store: { keys: recorder } }, {
    logger: quiet,
    onSocket: (s) => {
      link = attachSidecar(s, { organizationId: 5, organizationPhoneId, url: sidecar.ws, token: TOKEN, logger: quiet, phoneJid: JID, authKeys: recorder, removeCreds })
    },
  })
  cleanups.push(async () => { link.detach(); sock.end(undefined) })
  await eventually(() => link.connected, 'link connected')
  const before = await present()
  assert.ok(before.has('session-15550000100.0') && before.has('creds'), [...before].join(' '))

  // A genuine Bad MAC from peer 15550000100 (its CIPHERTEXT stub, as the socket upserts it).
  const [stub] = await badMacStubs(party('79001110099@s.whatsapp.net'), 1)
  sock.ev.emit('messages.upsert', { messages: [stub], type: 'notify' })
  await eventually(async () => !(await present()).has('session-15550000100.0'), 'the failing peer\'s session deleted')
  const healed = await present()
  assert.deepEqual([...before].filter((key) => !healed.has(key)), ['session-15550000100.0'], 'only that session went')
  const metric = await eventually(async () => {
    const line = (await sidecar.metrics()).split('\n').find((l) => l.startsWith('whatsapp_auth_keys_deleted_total{scope="peer_session"}'))
    return line && Number(line.split(' ').pop()) >= 1 && line
  }, 'the heal counted with the keysDeleted the adapter acked')
  assert.ok(metric)

  // An operator's close: everything of the phone goes through the backend's store, creds too.
  const beforeClose = await present()
  const closed = await sidecar.post(`/v1/sessions/${organizationPhoneId}/close`, { reason: 'Test logout' })
  assert.equal(closed.status, 200, JSON.stringify(closed.body))
  assert.equal(closed.body.socket, 'ended')
  assert.equal(closed.body.keysDeleted, beforeClose.size, `what was there (${[...beforeClose].join(' ')})`)
  assert.deepEqual([...(await present())], [], 'nothing of the phone is left')
  return closed.body
}

test('useMultiFileAuthState: a heal deletes the failing peer\'s session file, a close the whole folder', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'wa-keys-'))
  const folder = path.join(dir, 'phone-4401')
  const { state, saveCreds } = await B.useMultiFileAuthState(folder)
  await saveCreds() // creds.json, as a backend writes it
  const present = async () => {
    if (!fs.existsSync(folder)) return new Set()
    // Back from file names to key names (useMultiFileAuthState writes `${type}-${id}.json`).
    return new Set(fs.readdirSync(folder).map((name) => name.replace(/\.json$/, '')))
  }
  // The README's hook for useMultiFileAuthState: what is left in the folder (creds.json), then the folder.
  const removeCreds = async () => {
    const left = fs.existsSync(folder) ? fs.readdirSync(folder).length : 0
    fs.rmSync(folder, { recursive: true, force: true })
    return left
  }
  await heal_then_close({ organizationPhoneId: 4401, keys: state.keys, removeCreds, present })
  fs.rmSync(dir, { recursive: true, force: true })
})

async function freePort() {
  const server = net.createServer()
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve))
  const { port } = server.address()
  await new Promise((resolve) => server.close(resolve))
  return port
}

// A SignalKeyStore over a Redis hash per phone, the way Evolution API keeps one: fields `${type}-${id}` and `creds`.
function redisKeyStore(redis, hash) {
  return {
    async get(type, ids) {
      const values = ids.length ? await redis.hmget(hash, ...ids.map((id) => `${type}-${id}`)) : []
      const out = {}
      ids.forEach((id, i) => {
        if (values[i] !== null) out[id] = JSON.parse(values[i], B.BufferJSON.reviver)
      })
      return out
    },
    async set(data) {
      const multi = redis.multi()
      for (const type in data) {
        for (const id in data[type]) {
          const value = data[type][id]
          if (value) multi.hset(hash, `${type}-${id}`, JSON.stringify(value, B.BufferJSON.replacer))
          else multi.hdel(hash, `${type}-${id}`)
        }
      }
      await multi.exec()
    },
  }
}

test('a store over a real Redis: the heal and the close go through the store\'s own set(... null)', async () => {
  const port = await freePort()
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'wa-redis-'))
  const server = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--dir', dir, '--save', '', '--appendonly', 'no'], { stdio: 'ignore' })
  cleanups.push(async () => { server.kill('SIGTERM'); fs.rmSync(dir, { recursive: true, force: true }) })
  const cli = (...args) => spawnSync('redis-cli', ['-h', '127.0.0.1', '-p', String(port), '--raw', ...args], { encoding: 'utf8' }).stdout.trim()
  await eventually(() => cli('PING') === 'PONG', 'redis-server up')
  const redis = new Redis({ host: '127.0.0.1', port, lazyConnect: false, maxRetriesPerRequest: 1 })
  cleanups.push(() => redis.quit())
  const hash = 'evolution:baileys:4402'
  const neighbour = 'evolution:baileys:4403'
  await redis.hset(hash, 'creds', JSON.stringify(B.initAuthCreds(), B.BufferJSON.replacer))
  await redis.hset(neighbour, 'creds', '{}', 'session-15550000100.0', '{}')
  const present = async () => new Set(cli('HKEYS', hash).split('\n').filter(Boolean))
  const removeCreds = async () => Number(await redis.hdel(hash, 'creds'))
  await heal_then_close({ organizationPhoneId: 4402, keys: redisKeyStore(redis, hash), removeCreds, present })
  assert.deepEqual(cli('HKEYS', neighbour).split('\n').sort(), ['creds', 'session-15550000100.0'], 'the neighbour\'s hash is untouched')
})

test('the acks with keysDeleted match the runtime link\'s JSON Schema', () => {
  const ack = { type: 'command.ack', commandId: 'c1', ok: true, error: null, keysDeleted: 3 }
  assert.ok(validateFrame(ack), JSON.stringify(validateFrame.errors))
  assert.ok(!validateFrame({ ...ack, keysDeleted: -1 }))
  assert.ok(!validateFrame({ ...ack, keysDeleted: 'three' }))
})
