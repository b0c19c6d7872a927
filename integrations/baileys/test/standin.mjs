// A loopback WhatsApp stand-in for the adapter's tests: the real makeWASocket connects to it over a live
// WebSocket (Noise XX handshake, binary-node stanzas), built from Baileys' own exported crypto and codec
// helpers, after ../../../shared/reference/baileys-harness/session_log.mjs. It answers the queries a logged-in
// socket makes, serves app-state syncs the test scripts, and hosts app-state blobs on a loopback HTTP server
// reached through an undici dispatcher given to makeWASocket's `options` (Baileys 7 downloads with fetch).
// Test-only patch: Baileys 7 checks the Noise certificate against WhatsApp's root key, so this module overwrites
// that key in memory with its own. Nothing leaves 127.0.0.1.
import http from 'node:http'
import { createRequire } from 'node:module'
import * as B from '@whiskeysockets/baileys'
import { memStore } from './memstore.mjs'

const require = createRequire(import.meta.url)
const { WebSocketServer } = require('ws')

const {
  proto, Curve, hkdf, aesEncryptGCM, aesDecryptGCM, sha256, encodeBinaryNode, decodeBinaryNode,
  NOISE_MODE, NOISE_WA_HEADER, WA_CERT_DETAILS, initAuthCreds,
} = B
const makeWASocket = B.default?.default ?? B.default ?? B.makeWASocket

export const ME_PN = '15550001111:7@s.whatsapp.net'
export const ME_LID = '205550001111777:7@lid'
export const APP_KEY_ID = 'AAAAAFBQ'
const tsNow = () => Math.floor(Date.now() / 1000).toString()
export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

const root = Curve.generateKeyPair()
const intermediate = Curve.generateKeyPair()
const serverStatic = Curve.generateKeyPair()
if (WA_CERT_DETAILS.PUBLIC_KEY?.length === 32) WA_CERT_DETAILS.PUBLIC_KEY.set(root.public) // see the header
const certDetails = (serial, issuerSerial, key) =>
  proto.CertChain.NoiseCertificate.Details.encode({ serial, issuerSerial, key, notBefore: 0, notAfter: 4102444800 }).finish()
const interDetails = certDetails(1, 0, intermediate.public)
const leafDetails = certDetails(2, 1, serverStatic.public)
const certChain = proto.CertChain.encode({
  intermediate: { details: interDetails, signature: Curve.sign(root.private, interDetails) },
  leaf: { details: leafDetails, signature: Curve.sign(intermediate.private, leafDetails) },
}).finish()

function frame(bytes) {
  const out = Buffer.alloc(3 + bytes.length)
  out[0] = (bytes.length >>> 16) & 0xff
  out[1] = (bytes.length >>> 8) & 0xff
  out[2] = bytes.length & 0xff
  Buffer.from(bytes).copy(out, 3)
  return out
}
const ivOf = (counter) => {
  const iv = Buffer.alloc(12)
  iv.writeUInt32BE(counter, 8)
  return iv
}

// One client connection: the server side of the Noise handshake, then decrypted stanzas to `onNode`.
function serverConnection(ws, standIn) {
  let hash = Buffer.from(NOISE_MODE)
  let salt = hash
  let key = hash
  let counter = 0
  let pending = Buffer.alloc(0)
  let introSkipped = false
  let state = 'hello'
  let ephemeral, sendKey, receiveKey
  let sent = 0
  let received = 0
  const authenticate = (data) => { hash = sha256(Buffer.concat([hash, data])) }
  const mix = async (data) => {
    const k = Buffer.from(await hkdf(Buffer.from(data), 64, { salt, info: '' }))
    salt = k.subarray(0, 32)
    key = k.subarray(32)
    counter = 0
  }
  const encrypt = (plain) => { const c = aesEncryptGCM(plain, key, ivOf(counter++), hash); authenticate(c); return c }
  const decrypt = (cipher) => { const p = aesDecryptGCM(cipher, key, ivOf(counter++), hash); authenticate(cipher); return p }
  authenticate(NOISE_WA_HEADER)
  const conn = {
    ws,
    closed: false,
    loggedIn: false,
    deaf: false, // stops delivering traffic; still answers every query (pings included)
    mute: false, // stops answering queries too
    privacyQueries: 0,
    async send(node) {
      if (conn.closed || ws.readyState !== 1) return
      ws.send(frame(aesEncryptGCM(encodeBinaryNode(node), sendKey, ivOf(sent++), Buffer.alloc(0))))
    },
    async onData(data) {
      pending = Buffer.concat([pending, data])
      if (!introSkipped) {
        if (pending.length < 4) return
        pending = pending.subarray(4) // 'WA' 6 3
        introSkipped = true
      }
      while (pending.length >= 3) {
        const size = (pending[0] << 16) | (pending[1] << 8) | pending[2]
        if (pending.length < size + 3) return
        const body = pending.subarray(3, size + 3)
        pending = pending.subarray(size + 3)
        await conn.onFrame(body)
      }
    },
    async onFrame(body) {
      if (state === 'hello') {
        const hello = proto.HandshakeMessage.decode(body)
        const clientEphemeral = hello.clientHello.ephemeral
        authenticate(clientEphemeral)
        ephemeral = Curve.generateKeyPair()
        authenticate(ephemeral.public)
        await mix(Curve.sharedKey(ephemeral.private, clientEphemeral))
        const staticPart = encrypt(serverStatic.public)
        await mix(Curve.sharedKey(serverStatic.private, clientEphemeral))
        const payload = encrypt(certChain)
        ws.send(frame(proto.HandshakeMessage.encode({ serverHello: { ephemeral: ephemeral.public, static: staticPart, payload } }).finish()))
        state = 'finish'
      } else if (state === 'finish') {
        const finish = proto.HandshakeMessage.decode(body)
        const clientStatic = decrypt(finish.clientFinish.static)
        await mix(Curve.sharedKey(ephemeral.private, clientStatic))
        decrypt(finish.clientFinish.payload)
        const k = Buffer.from(await hkdf(Buffer.alloc(0), 64, { salt, info: '' }))
        receiveKey = k.subarray(0, 32)
        sendKey = k.subarray(32)
        state = 'transport'
        await conn.send({ tag: 'success', attrs: { t: tsNow(), props: '35', abprops: '1', location: 'frc', creation: '1700000000', lid: ME_LID.replace(':7', '') } })
        await sleep(100)
        await conn.send({ tag: 'ib', attrs: { from: 's.whatsapp.net' }, content: [{ tag: 'offline', attrs: { count: '0' } }] })
        conn.loggedIn = true
        standIn.connections.push(conn)
        for (const waiter of standIn.loginWaiters.splice(0)) waiter(conn)
      } else {
        const node = await decodeBinaryNode(aesDecryptGCM(body, receiveKey, ivOf(received++), Buffer.alloc(0)))
        await standIn.onNode(node, conn)
      }
    },
  }
  return conn
}

export async function startStandIn() {
  const wss = new WebSocketServer({ host: '127.0.0.1', port: 0 })
  await new Promise((resolve) => wss.on('listening', resolve))
  const blobs = new Map()
  const media = http.createServer((request, response) => {
    const blob = blobs.get(new URL(request.url, 'http://x').pathname)
    if (!blob) {
      response.writeHead(404)
      return response.end()
    }
    response.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': blob.length })
    response.end(blob)
  })
  await new Promise((resolve) => media.listen(0, '127.0.0.1', resolve))
  const mediaOrigin = `http://127.0.0.1:${media.address().port}`
  // Node's fetch creates its global dispatcher on first use; a request to the media host makes it exist.
  await (await fetch(`${mediaOrigin}/warm-up`)).arrayBuffer()
  const globalDispatcher = globalThis[Symbol.for('undici.globalDispatcher.1')]
  const standIn = {
    wsUrl: `ws://127.0.0.1:${wss.address().port}/ws/chat`,
    blobs,
    connections: [],
    loginWaiters: [],
    received: [],
    // Media downloads (https://mmg.whatsapp.net/...) go to the loopback media host instead.
    dispatcher: { dispatch: (options, handler) => globalDispatcher.dispatch({ ...options, origin: mediaOrigin }, handler) },
    // Scripted answer to an app-state sync: (collectionNode) => collection node for the result.
    appState: null,
    nextLogin() {
      return new Promise((resolve) => standIn.loginWaiters.push(resolve))
    },
    async onNode(node, conn) {
      standIn.received.push(node)
      if (node.tag !== 'iq' || conn.mute) return
      const child = Array.isArray(node.content) ? node.content[0] : undefined
      const { id, xmlns, type } = node.attrs
      if (xmlns === 'privacy') conn.privacyQueries++
      const result = (content) => conn.send({ tag: 'iq', attrs: { from: 's.whatsapp.net', type: 'result', id }, content })
      if (xmlns === 'encrypt' && child?.tag === 'count') return result([{ tag: 'count', attrs: { value: '812' } }])
      if (xmlns === 'encrypt' && child?.tag === 'digest') return result([{ tag: 'digest', attrs: {} }])
      if (xmlns === 'w:sync:app:state' && standIn.appState) {
        const collections = (child.content || []).filter((c) => c.tag === 'collection')
        return result([{ tag: 'sync', attrs: {}, content: await Promise.all(collections.map((c) => standIn.appState(c))) }])
      }
      if (type === 'get' || type === 'set') return result(undefined)
    },
    // Inbound traffic on one connection: a delivery receipt every `everyMs` while it is not deaf.
    deliver(conn, everyMs) {
      let n = 0
      const timer = setInterval(() => {
        if (conn.closed) return clearInterval(timer)
        if (conn.deaf) return
        conn.send({ tag: 'receipt', attrs: { id: `3EB0${Date.now()}${n++}`, from: '15550002222@s.whatsapp.net', t: tsNow() } })
      }, everyMs)
      return () => clearInterval(timer)
    },
    // What WhatsApp sends a restricted number. A mex notification (reach-out time lock, message capping), as
    // Baileys reads one: <notification type=mex><update op_name=…>JSON</update></notification>.
    async mex(conn, opName, data) {
      await conn.send({
        tag: 'notification',
        attrs: { from: 's.whatsapp.net', type: 'mex', id: `${Date.now()}${Math.random()}`.replace('.', ''), t: tsNow() },
        content: [{ tag: 'update', attrs: { op_name: opName }, content: Buffer.from(JSON.stringify({ data })) }],
      })
    },
    // The server's ack refusing one of our messages (error 463, 479, ...).
    async refuse(conn, { id, to, error }) {
      await conn.send({ tag: 'ack', attrs: { class: 'message', id, from: to, t: tsNow(), error: String(error) } })
    },
    // <failure reason=…>: the server ends the connection (402 temporary ban with `expire` seconds, 403, 405).
    async fail(conn, reason, attrs = {}) {
      await conn.send({ tag: 'failure', attrs: { reason: String(reason), ...attrs } })
    },
    async serverSync(conn, name) {
      await conn.send({
        tag: 'notification',
        attrs: { from: 's.whatsapp.net', type: 'server_sync', id: `${Date.now()}${Math.random()}`.replace('.', ''), t: tsNow() },
        content: [{ tag: 'collection', attrs: { name, version: '2' } }],
      })
    },
    async close() {
      for (const client of wss.clients) client.terminate()
      await new Promise((resolve) => wss.close(resolve))
      await new Promise((resolve) => media.close(resolve))
    },
  }
  wss.on('connection', (ws) => {
    const conn = serverConnection(ws, standIn)
    ws.on('message', (data) => conn.onData(Buffer.from(data)).catch(() => ws.terminate()))
    ws.on('close', () => { conn.closed = true })
  })
  return standIn
}

export const appStateKey = (fill) => ({ keyData: Buffer.alloc(32, fill), fingerprint: { rawId: 1, currentIndex: 1, deviceIndexes: [0] }, timestamp: 1764043200 })

// A device that was paired before: creds with `me`, registered, and (optionally) an app-state key.
export async function pairedDevice({ key } = {}) {
  const creds = initAuthCreds()
  creds.me = { id: ME_PN, lid: ME_LID, name: 'Sidecar Test' }
  creds.registered = true
  creds.platform = 'web'
  creds.accountSyncCounter = 1
  creds.processedHistoryMessages = []
  creds.myAppStateKeyId = APP_KEY_ID
  const store = memStore()
  if (key) await store.keys.set({ 'app-state-sync-key': { [APP_KEY_ID]: key } })
  return { creds, store }
}

// The real makeWASocket against the stand-in; resolves once the stand-in has logged the socket in.
export async function openSocket(standIn, device, { logger, appStateMacVerification, onSocket } = {}) {
  const keys = B.addTransactionCapability(device.store.keys, logger, { maxCommitRetries: 2, delayBetweenTriesMs: 10 })
  const login = standIn.nextLogin()
  const sock = makeWASocket({
    waWebSocketUrl: standIn.wsUrl,
    auth: { creds: device.creds, keys },
    logger,
    fireInitQueries: false,
    markOnlineOnConnect: false,
    syncFullHistory: false,
    defaultQueryTimeoutMs: 4000,
    options: { dispatcher: standIn.dispatcher },
    ...(appStateMacVerification ? { appStateMacVerification } : {}),
  })
  sock.ev.on('creds.update', (update) => Object.assign(device.creds, update))
  onSocket?.(sock) // what a backend does right after makeWASocket (attachSidecar), before the login completes
  const conn = await login
  return { sock, conn }
}

// App-state payloads, encoded the way WhatsApp's server does (Baileys' own encoder).
const muteAction = (jid, n) => ({
  type: 'regular_high',
  index: ['mute', jid],
  syncAction: { muteAction: { muted: true, muteEndTimestamp: 1764100000 + n } },
  apiVersion: 2,
  operation: proto.SyncdMutation.SyncdOperation.SET,
})

// Patches under `key`, starting from `state` (a fresh one by default); returns their bytes and the end state.
export async function encodePatches(key, count = 1, state = B.newLTHashState()) {
  const patches = []
  for (let n = 0; n < count; n++) {
    const encoded = await B.encodeSyncdPatch(muteAction(`1555000${2000 + n}@s.whatsapp.net`, n), APP_KEY_ID, state, async () => key)
    state = encoded.state
    patches.push({ patch: encoded.patch, version: state.version })
  }
  return { patches, state }
}

export const patchNode = ({ patch, version }, extra = {}) => ({
  tag: 'patch',
  attrs: {},
  content: Buffer.from(proto.SyncdPatch.encode({ ...patch, ...extra, version: { version } }).finish()),
})

export const collectionResult = (name, version, content) => ({ tag: 'collection', attrs: { name, version: String(version) }, content })

// A snapshot blob on the media host, as WhatsApp serves one; returns the <snapshot> node referencing it.
export async function snapshotNode(standIn, { records, version, mac, keyId = APP_KEY_ID }) {
  const crypto = await import('node:crypto')
  const plain = Buffer.from(proto.SyncdSnapshot.encode({ version: { version }, records, mac, keyId: { id: Buffer.from(keyId, 'base64') } }).finish())
  const mediaKey = crypto.randomBytes(32)
  const keys = await B.getMediaKeys(mediaKey, 'md-app-state')
  const cipher = crypto.createCipheriv('aes-256-cbc', keys.cipherKey, keys.iv)
  const encrypted = Buffer.concat([cipher.update(plain), cipher.final()])
  const mac10 = crypto.createHmac('sha256', keys.macKey).update(Buffer.concat([keys.iv, encrypted])).digest().subarray(0, 10)
  const blob = Buffer.concat([encrypted, mac10])
  const directPath = `/v/t62.1234-24/snapshot-${crypto.randomUUID()}.enc`
  standIn.blobs.set(directPath, blob)
  const reference = proto.ExternalBlobReference.encode({
    mediaKey, directPath, handle: 'h', fileSizeBytes: blob.length, fileSha256: sha256(plain), fileEncSha256: sha256(blob),
  }).finish()
  return { tag: 'snapshot', attrs: {}, content: Buffer.from(reference) }
}
