'use strict'
// Wires one Baileys socket to the whatsapp-session-sidecar runtime link (protocol v1).
//
//   const logger = sidecarLogger(pino())                      // optional: app-state failures are log lines
//   const sock = makeWASocket({ auth, logger })
//   attachSidecar(sock, { organizationId: 7, organizationPhoneId: 42, url, token, logger })
//
// It never blocks or crashes the backend: events are buffered (bounded) while the sidecar is away and sent in
// batches; every failure of the link is logged and retried with backoff. Each connection starts with
// runtime.info; events carry a seq and are kept until the sidecar acknowledges them (events.ack), then resent
// after a reconnect if not. Works with Baileys 6.x and 7.x.

const crypto = require('node:crypto')
const os = require('node:os')
const WebSocket = require('ws')
// Both generated from the sidecar's own definitions (python -m docs.generate): the runtime link's schema
// (sidecar/events/schema.py) and the app-state message table (sidecar/rules/app_state.py).
const LINK_SCHEMA = require('./runtime-link.schema.json')
const APP_STATE = require('./app-state-messages.json')
const ADAPTER_VERSION = require('./package.json').version

const CIPHERTEXT = 2 // proto.WebMessageInfo.StubType.CIPHERTEXT
const LOGGED_OUT = 401 // DisconnectReason.loggedOut
const RESTART_REQUIRED = 515 // DisconnectReason.restartRequired: the usual "reconnect unless logged out" branch reconnects
// Inbound stanzas counted for the liveness watch (deaf sessions). Answers to our own queries (iq results, which
// include the keep-alive pings a deaf session still answers) are not traffic.
const INBOUND_TAGS = { message: 'messages', receipt: 'receipts', notification: 'notifications' }
const errorFields = LINK_SCHEMA.$defs.DecryptError.properties
const nonNull = (property) => (property.anyOf || [property]).find((option) => option.type !== 'null')
const USER_JID = new RegExp(errorFields.phoneJid.pattern)
const COLLECTION = new RegExp(nonNull(errorFields.collection).pattern)
const APP_STATE_PATCH_NAMES = APP_STATE.collections
const APP_STATE_DEDUP_MS = 10_000
const MESSAGE_ID = new RegExp(nonNull(errorFields.messageId).pattern)
const VERSION = new RegExp(nonNull(LINK_SCHEMA.$defs.RuntimeInfo.properties.libraryVersion).pattern)
const MAX_DETAIL = nonNull(LINK_SCHEMA.$defs.AccountRestriction.properties.detail).maxLength
// What WhatsApp does to the number, as Baileys shows it (account.restriction; sidecar/rules/restrictions.py):
// a close with one of these codes, and acks that refuse a message with one of these errors.
const CLOSE_RESTRICTIONS = { 402: 'temporary_ban', 403: 'forbidden', 405: 'client_outdated' }
const REFUSALS = {
  463: { kind: 'ack_463', detail: 'account restricted or missing tctoken for contact' },
  479: { kind: 'ack_479', detail: 'smax-invalid: stanza rejected by server' },
}
const ERROR_STATUS = 0 // proto.WebMessageInfo.Status.ERROR
// Per phone, across its sockets: the last restriction state reported per kind (a repeat is not sent again).
const restrictionsSent = new Map()
// Phones that showed a QR code or completed a pairing: their next `open` is a new login. Kept per phone
// across sockets, because Baileys restarts the socket (515) right after pairing.
const pairedPhones = new Set()

// App-state failures reach only the logger: Baileys 6.x logs them at info level, 7.x (with
// appStateMacVerification) at warn level. One failure can log twice (retry from scratch, then give up).
// Baileys 7 skips a record it cannot decrypt without a word; what it still logs is below, each with the
// `kind` the sidecar counts it as (whatsapp_app_state_sync_failures_total; sidecar/rules/app_state.py).
const APP_STATE_SIGNALS = APP_STATE.signals.map((signal) => ({ ...signal, regex: new RegExp(signal.pattern, signal.flags) }))
const firstSignal = (text, foundIn) => APP_STATE_SIGNALS.find((signal) => signal.foundIn === foundIn && signal.regex.test(text))

function appStateFailure(record) {
  if (!record || typeof record !== 'object') return null
  const msg = typeof record.msg === 'string' ? record.msg : ''
  const collection = typeof record.name === 'string' && COLLECTION.test(record.name) ? record.name : undefined
  if (APP_STATE.wrapperMessages.some((wrapper) => msg.startsWith(wrapper))) {
    const error = record.error ?? record.err
    const text = typeof error === 'string' ? error : error?.stack || error?.message || ''
    const known = firstSignal(text, 'error')
    return known ? { error: text.split('\n')[0], collection, kind: known.kind } : null
  }
  const known = firstSignal(msg, 'message')
  return known ? { error: msg, collection, kind: known.kind } : null
}

// A pino-compatible logger that forwards everything to `base` and lets attached sidecar links see app-state
// failures. Pass it to makeWASocket and to attachSidecar.
function sidecarLogger(base, bindings = {}, taps = new Set()) {
  const wrap = (level) => (obj, ...rest) => {
    const record = typeof obj === 'object' && obj !== null ? { ...bindings, ...obj, msg: rest[0] } : null
    const failure = appStateFailure(record)
    if (failure) for (const tap of taps) tap(failure)
    return base[level](obj, ...rest)
  }
  const logger = {
    get level() { return base.level },
    set level(value) { base.level = value },
    child(more, options) { return sidecarLogger(base.child(more, options), { ...bindings, ...more }, taps) },
    trace: wrap('trace'), debug: wrap('debug'), info: wrap('info'), warn: wrap('warn'), error: wrap('error'),
    fatal: wrap(typeof base.fatal === 'function' ? 'fatal' : 'error'),
    [Symbol.for('wa-sidecar.taps')]: taps,
  }
  return logger
}

// The WhatsApp library this process runs, as installed next to the adapter (the backend's own Baileys).
function installedLibrary() {
  for (const name of ['@whiskeysockets/baileys', 'baileys']) {
    try {
      const { version } = require(`${name}/package.json`)
      if (typeof version === 'string' && VERSION.test(version)) return { name: 'baileys', version }
    } catch {}
  }
  return null
}

// runtime.info, the first frame of each link connection: who this runtime is and what it runs.
function runtimeInfo(runtimeId, library) {
  const info = { type: 'runtime.info', runtimeId, adapterVersion: ADAPTER_VERSION }
  if (library && VERSION.test(library.name) && VERSION.test(library.version)) {
    info.library = library.name
    info.libraryVersion = library.version
  }
  return info
}

// The Unix time (seconds, as a string or a number) or Date Baileys gives, as RFC 3339; undefined when it is not one.
function instant(value) {
  const moment = value instanceof Date ? value : (typeof value === 'string' || typeof value === 'number') && /^\d{1,12}$/.test(String(value)) ? new Date(Number(value) * 1000) : null
  return moment && !Number.isNaN(moment.getTime()) && moment.getTime() > 0 ? moment.toISOString() : undefined
}

function loggedOutError(reason) {
  const error = new Error(`Logged out by whatsapp-session-sidecar: ${reason}`)
  // A Boom-shaped error: backends test lastDisconnect.error.output.statusCode === DisconnectReason.loggedOut.
  error.isBoom = true
  error.output = { statusCode: LOGGED_OUT, payload: { statusCode: LOGGED_OUT, error: 'Unauthorized', message: error.message }, headers: {} }
  error.data = { reason, by: 'whatsapp-session-sidecar' }
  return error
}

function restartError(reason) {
  const error = new Error(`Restart requested by whatsapp-session-sidecar: ${reason}`)
  error.isBoom = true
  error.output = { statusCode: RESTART_REQUIRED, payload: { statusCode: RESTART_REQUIRED, error: 'Restart Required', message: error.message }, headers: {} }
  error.data = { reason, by: 'whatsapp-session-sidecar' }
  return error
}

// One real round trip with WhatsApp's server: the account's privacy settings (an iq the server's account
// service answers, unlike the keep-alive ping a deaf session still answers; read-only, small, never cached when
// forced). Falls back to a ping where the socket has no fetchPrivacySettings.
async function probeRoundTrip(sock) {
  const started = performance.now()
  if (typeof sock.fetchPrivacySettings === 'function') await sock.fetchPrivacySettings(true)
  else await sock.query({ tag: 'iq', attrs: { to: 's.whatsapp.net', type: 'get', xmlns: 'w:p' }, content: [{ tag: 'ping', attrs: {} }] })
  return Math.round((performance.now() - started) * 1000) / 1000
}

// --key-store runtime: the backend's own SignalKeyStore (Redis, MongoDB, SQL, files), wrapped so the adapter knows
// which ids exist per type (those read back and those written), and can delete exactly those through the store's
// own set(... null) when the sidecar heals (auth.clear) or logs out (session.end). Put it innermost, under any
// cache: `makeCacheableSignalKeyStore(recordingKeyStore(state.keys), logger)`, and pass it as `authKeys`.
function recordingKeyStore(keys) {
  if (!keys || typeof keys.get !== 'function' || typeof keys.set !== 'function') throw new TypeError('recordingKeyStore needs a SignalKeyStore (get and set)')
  const known = new Map() // type -> Set of ids present in the store
  const note = (type, id, present) => {
    let ids = known.get(type)
    if (!ids) known.set(type, (ids = new Set()))
    if (present) ids.add(id)
    else ids.delete(id)
  }
  const store = {
    async get(type, ids) {
      const found = await keys.get(type, ids)
      for (const id of ids) if (found?.[id] !== undefined && found?.[id] !== null) note(type, id, true)
      return found
    },
    async set(data) {
      await keys.set(data)
      for (const type in data) for (const id in data[type] || {}) note(type, id, data[type][id] !== null && data[type][id] !== undefined)
    },
    // The ids of keys with one of these prefixes (`${type}-${id}`, as the sidecar names them); null: every key.
    known(prefixes = null) {
      const out = {}
      for (const [type, ids] of known) {
        for (const id of ids) if (!prefixes || prefixes.some((prefix) => `${type}-${id}`.startsWith(prefix))) (out[type] ??= []).push(id)
      }
      return out
    },
    // Delete them through the store itself; returns how many were present. `candidates` ({type: [ids]}): ids that
    // may exist without having been read or written here (app-state versions, the current sync key): looked up.
    async deleteKeys(prefixes = null, candidates = {}) {
      const doomed = store.known(prefixes)
      for (const type in candidates) {
        const unknown = candidates[type].filter((id) => !(doomed[type] || []).includes(id))
        if (!unknown.length) continue
        const found = await keys.get(type, unknown)
        for (const id of unknown) if (found?.[id] !== undefined && found?.[id] !== null) (doomed[type] ??= []).push(id)
      }
      const changes = {}
      let count = 0
      for (const type in doomed) {
        changes[type] = {}
        for (const id of doomed[type]) {
          changes[type][id] = null
          count++
        }
      }
      if (count) await store.set(changes)
      return count
    },
  }
  for (const name of ['transaction', 'isInTransaction', 'clear']) if (typeof keys[name] === 'function') store[name] = keys[name].bind(keys)
  return store
}

function attachSidecar(sock, options) {
  const {
    organizationId, organizationPhoneId, url, token,
    logger = console, keyCache, clearKeys,
    // --key-store runtime: the recordingKeyStore under the socket's auth keys, and the backend's own way of
    // removing the creds (and whatever else it keeps) at a logout; it may return how many items it removed.
    authKeys = null, removeCreds = null,
    batchSize = 100, maxBuffered = 10_000, flushIntervalMs = 50,
    reconnectInitialMs = 500, reconnectMaxMs = 30_000,
    activityIntervalMs = 30_000,
    // Names this runtime on the link: events carry a seq, are kept until the sidecar's events.ack covers them,
    // and are sent again after a reconnect (at most maxUnacked kept; past that the oldest go, counted).
    runtimeId = `${os.hostname()}/${process.pid}/${organizationPhoneId}/${crypto.randomBytes(4).toString('hex')}`,
    maxUnacked = 10_000,
    // What runtime.info says this process runs ({ name, version }); found in node_modules by default.
    library = installedLibrary(),
  } = options
  if (!Number.isInteger(organizationId) || organizationId < 1) throw new TypeError('organizationId must be a positive integer')
  if (!Number.isInteger(organizationPhoneId) || organizationPhoneId < 1) throw new TypeError('organizationPhoneId must be a positive integer')
  if (typeof url !== 'string' || !/^wss?:\/\//.test(url)) throw new TypeError('url must be ws://host:port/v1/runtime')

  const log = typeof logger.child === 'function' ? logger.child({ component: 'wa-sidecar-link', organizationPhoneId }) : logger
  const buffer = []
  // Message ids already reported: re-upserts (append, history) are not new faults; FAILED ones wait for a recovery.
  const seenStubs = new Map()
  const FAILED = 'failed'
  const RECOVERED = 'recovered'
  const seenAppState = new Map()
  const stats = { sent: 0, dropped: 0, connects: 0, commands: 0, resent: 0, unackedDropped: 0 }
  let seq = 0
  const unacked = [] // events sent and not yet acknowledged as durable, in order
  let ackedEver = false // a sidecar that never acknowledges (an older one) is sent nothing twice
  let ws = null
  let closed = false
  let reconnectDelay = reconnectInitialMs
  let reconnectTimer = null
  let flushTimer = null
  const inbound = { messages: 0, receipts: 0, notifications: 0, last: null }
  let lastInbound = null // the last inbound stanza ever seen (inbound.last is since the last report)
  let whatsappOpen = false // the socket's connection with WhatsApp, from connection.update
  const countInbound = (kind) => () => {
    inbound[kind]++
    inbound.last = lastInbound = new Date()
  }
  const inboundListeners = Object.entries(INBOUND_TAGS).map(([tag, kind]) => [`CB:${tag}`, countInbound(kind)])
  // Every interval, for a session that had any inbound traffic: one small event with the counts and the time of
  // the last stanza (the sidecar's baseline for deaf sessions). A silent session sends nothing.
  const activityTimer = setInterval(() => {
    if (!inbound.last) return
    const { messages, receipts, notifications, last } = inbound
    Object.assign(inbound, { messages: 0, receipts: 0, notifications: 0, last: null })
    enqueue({ type: 'activity', messages, receipts, notifications, lastInboundAt: last.toISOString() })
  }, activityIntervalMs)
  activityTimer.unref?.()

  const phoneJid = () => {
    const jid = options.phoneJid || sock.user?.id || sock.authState?.creds?.me?.id
    return typeof jid === 'string' && USER_JID.test(jid) ? jid : null
  }

  function enqueue(event) {
    const jid = phoneJid()
    if (!jid) return log.debug?.({ event: event.type }, 'no phone JID yet; event not reported')
    if (buffer.length >= maxBuffered) {
      buffer.shift()
      stats.dropped++
    }
    buffer.push({ ...event, organizationId, organizationPhoneId, phoneJid: jid, at: new Date().toISOString() })
    if (!flushTimer) flushTimer = setTimeout(flush, flushIntervalMs)
  }

  function stamped(event) {
    const withSeq = { ...event, seq: ++seq }
    if (unacked.length >= maxUnacked) {
      unacked.shift()
      if (ackedEver) stats.unackedDropped++
    }
    unacked.push(withSeq)
    return withSeq
  }

  function acknowledged(upTo) {
    ackedEver = true
    while (unacked.length && unacked[0].seq <= upTo) unacked.shift()
  }

  function resend() {
    // What the last connection took but never acknowledged goes first, in order (the sidecar skips what it has).
    if (!ackedEver || !unacked.length) return
    for (let start = 0; start < unacked.length; start += batchSize) {
      ws.send(JSON.stringify(unacked.slice(start, start + batchSize)))
    }
    stats.resent += unacked.length
  }

  function flush() {
    flushTimer = null
    if (!ws || ws.readyState !== WebSocket.OPEN) return
    while (buffer.length) {
      const batch = buffer.splice(0, batchSize).map(stamped)
      ws.send(JSON.stringify(batch), (error) => {
        if (error) {
          if (!ackedEver) { // without acknowledgements: keep it for the next connection as it was
            unacked.splice(unacked.length - batch.length, batch.length)
            buffer.unshift(...batch.map(({ seq: _, ...event }) => event))
          }
          log.warn?.({ err: error.message }, 'sidecar send failed')
        } else {
          stats.sent += batch.length
        }
      })
    }
  }

  // One restriction report; the same state as last reported for this phone and kind is not sent again, except a
  // refusal (each one extends how long the sidecar holds it).
  function restriction(kind, active, { until, code, detail } = {}) {
    const event = { type: 'account.restriction', kind, active }
    if (until) event.until = until
    if (Number.isInteger(code) && code >= 0 && code <= 999_999) event.code = code
    if (typeof detail === 'string' && /\S/.test(detail)) event.detail = detail.slice(0, MAX_DETAIL)
    const sent = restrictionsSent.get(organizationPhoneId) ?? new Map()
    const state = JSON.stringify([active, event.until, event.code, event.detail])
    const refusal = Object.values(REFUSALS).some((r) => r.kind === kind)
    if (!refusal && sent.get(kind) === state) return
    restrictionsSent.set(organizationPhoneId, sent.set(kind, state))
    enqueue(event)
  }

  function onConnectionUpdate(update) {
    if (update?.isNewLogin || update?.qr) pairedPhones.add(organizationPhoneId)
    const lock = update?.reachoutTimeLock
    if (lock && typeof lock === 'object') {
      const type = typeof lock.enforcementType === 'string' && lock.enforcementType !== 'DEFAULT' ? lock.enforcementType : undefined
      restriction('reachout_timelock', !!lock.isActive, lock.isActive ? { until: instant(lock.timeEnforcementEnds), detail: type } : {})
    }
    if (!update?.connection) return
    whatsappOpen = update.connection === 'open'
    const event = { type: 'connection.update', connection: update.connection }
    if (update.connection === 'open' && pairedPhones.delete(organizationPhoneId)) event.isNewLogin = true
    const statusCode = update.lastDisconnect?.error?.output?.statusCode
    if (Number.isInteger(statusCode) && statusCode >= 100 && statusCode <= 599) event.statusCode = statusCode
    enqueue(event)
    const closedBy = update.connection === 'close' && CLOSE_RESTRICTIONS[statusCode]
    if (closedBy) {
      const data = update.lastDisconnect?.error?.data
      // whatsmeow's TemporaryBan reads the same <failure reason=402 code=… expire=seconds>
      const expire = closedBy === 'temporary_ban' && /^\d{1,9}$/.test(String(data?.expire ?? '')) ? Number(data.expire) : null
      restriction(closedBy, true, {
        code: statusCode,
        until: expire ? new Date(Date.now() + expire * 1000).toISOString() : undefined,
        detail: String(update.lastDisconnect?.error?.message || '') || undefined,
      })
    }
    // A connection that opens is not banned, forbidden or outdated any more: the sidecar lifts those itself
    // (rules ENDED_BY_OPEN); here they are forgotten, so the next such close is reported again.
    if (update.connection === 'open') for (const kind of Object.values(CLOSE_RESTRICTIONS)) restrictionsSent.get(organizationPhoneId)?.delete(kind)
  }

  function onMessageCapping(info) {
    if (!info || typeof info !== 'object') return
    const capped = info.capping_status === 'CAPPED'
    const quota = Number.isInteger(info.total_quota) ? ` ${info.used_quota ?? '?'}/${info.total_quota} new chats this cycle` : ''
    restriction('message_cap', capped, capped ? { until: instant(info.cycle_end_timestamp), detail: `${info.capping_status}${quota}` } : {})
  }

  function onMessagesUpdate(updates) {
    for (const { key, update } of Array.isArray(updates) ? updates : []) {
      if (update?.status !== ERROR_STATUS || !key?.fromMe) continue
      const [code, text] = update.messageStubParameters || []
      const refusal = REFUSALS[code]
      if (refusal) restriction(refusal.kind, true, { code: Number(code), detail: typeof text === 'string' ? text : refusal.detail })
    }
  }

  function onMessagesUpsert({ messages, requestId } = {}) {
    for (const message of messages || []) {
      const id = `${message?.key?.remoteJid}/${message?.key?.id}`
      if (message?.messageStubType !== CIPHERTEXT) {
        // The same key id decrypted after a failure: re-sent after our retry receipt, or the phone's placeholder
        // resend (Baileys passes its requestId). Reported once; the sidecar counts what is never recovered as lost.
        if (message?.message && seenStubs.get(id) === FAILED) {
          seenStubs.set(id, RECOVERED)
          enqueue({ type: 'message.recovered', messageId: message.key.id, via: requestId ? 'placeholder' : 'retry' })
        }
        continue
      }
      const error = message.messageStubParameters?.[0]
      if (typeof error !== 'string' || !error) continue
      if (seenStubs.has(id)) continue
      const messageId = message.key?.id
      seenStubs.set(id, typeof messageId === 'string' && MESSAGE_ID.test(messageId) ? FAILED : true)
      if (seenStubs.size > 5_000) seenStubs.delete(seenStubs.keys().next().value)
      const event = { type: 'decrypt.error', error, source: 'message' }
      const peer = message.key?.participant || message.key?.remoteJid
      if (typeof peer === 'string' && USER_JID.test(peer)) event.peerJid = peer
      if (seenStubs.get(id) === FAILED) event.messageId = messageId
      enqueue(event)
    }
  }

  function onAppStateFailure({ error, collection, kind }) {
    const now = Date.now()
    const key = `${collection}/${kind}`
    if (now - (seenAppState.get(key) ?? -Infinity) < APP_STATE_DEDUP_MS) return
    seenAppState.set(key, now)
    enqueue({ type: 'decrypt.error', error, source: 'app-state', ...(collection ? { collection } : {}) })
  }

  async function clearCachedKeys(prefixes) {
    const matches = (type, id) => prefixes.some((prefix) => `${type}-${id}`.startsWith(prefix))
    const split = (cacheKey) => [cacheKey.slice(0, cacheKey.indexOf('.')), cacheKey.slice(cacheKey.indexOf('.') + 1)]
    const cached = async () => (keyCache && typeof keyCache.keys === 'function' ? await keyCache.keys() : [])
    const doomed = {}
    const doom = (type, id) => { (doomed[type] ??= {})[id] = null }
    // Ids to delete from the store: those the cache has seen, plus the app-state ids Baileys knows without a
    // listing (the collections and the current sync key).
    for (const cacheKey of await cached()) {
      const [type, id] = split(cacheKey)
      if (type && matches(type, id)) doom(type, id)
    }
    for (const name of APP_STATE_PATCH_NAMES) if (matches('app-state-sync-version', name)) doom('app-state-sync-version', name)
    const keyId = sock.authState?.creds?.myAppStateKeyId
    if (keyId && matches('app-state-sync-key', keyId)) doom('app-state-sync-key', keyId)
    const store = sock.authState?.keys
    if (store && Object.keys(doomed).length) await store.set(doomed)
    // Last, the cache itself: a cacheable store's set() caches the nulls it was given.
    let removed = 0
    for (const cacheKey of await cached()) {
      const [type, id] = split(cacheKey)
      if (type && matches(type, id)) {
        await keyCache.del(cacheKey)
        removed++
      }
    }
    if (typeof clearKeys === 'function') removed += Number(await clearKeys(prefixes)) || 0
    return removed
  }

  // The app-state ids Baileys knows without a listing (the collections' versions, the current sync key).
  function appStateCandidates(prefixes) {
    const matches = (type, id) => prefixes.some((prefix) => `${type}-${id}`.startsWith(prefix))
    const candidates = { 'app-state-sync-version': APP_STATE_PATCH_NAMES.filter((name) => matches('app-state-sync-version', name)) }
    const keyId = sock.authState?.creds?.myAppStateKeyId
    if (keyId && matches('app-state-sync-key', keyId)) candidates['app-state-sync-key'] = [keyId]
    return candidates
  }

  // --key-store runtime: everything of this phone deleted through the backend's store, then its creds.
  async function deleteEverything() {
    let deleted = authKeys ? await authKeys.deleteKeys(null, appStateCandidates([''])) : 0
    if (typeof removeCreds === 'function') {
      const removed = await removeCreds()
      deleted += removed === true ? 1 : Number(removed) || 0
    }
    return deleted
  }

  async function obey(command) {
    stats.commands++
    let ok = true
    let error = null
    let roundTripMs = null
    let keysDeleted = null
    try {
      if (command.organizationPhoneId !== organizationPhoneId) throw new Error(`not this socket's session (${command.organizationPhoneId})`)
      if (command.type === 'auth.clear') {
        // With authKeys the keys are the runtime's to delete (--key-store runtime): through the store first.
        if (authKeys) keysDeleted = await authKeys.deleteKeys(command.keyPrefixes || [], appStateCandidates(command.keyPrefixes || []))
        const removed = await clearCachedKeys(command.keyPrefixes || [])
        log.info?.({ keyPrefixes: command.keyPrefixes, removed, keysDeleted }, 'sidecar: cached keys dropped')
      } else if (command.type === 'session.end') {
        log.warn?.({ reason: command.reason }, 'sidecar: ending the session (logged out; do not reconnect)')
        detachListeners()
        sock.end(loggedOutError(command.reason))
        if (authKeys || typeof removeCreds === 'function') keysDeleted = await deleteEverything()
      } else if (command.type === 'session.probe') {
        roundTripMs = await probeRoundTrip(sock)
      } else if (command.type === 'session.restart') {
        log.warn?.({ reason: command.reason }, 'sidecar: restarting the socket (deaf session); the backend reconnects')
      } else {
        throw new Error(`unsupported: unknown command ${command.type}`)  // the protocol's word for "not implemented"
      }
    } catch (failure) {
      ok = false
      error = String(failure?.message || failure)
    }
    const ack = { type: 'command.ack', commandId: command.commandId, ok, error }
    if (roundTripMs !== null) ack.roundTripMs = roundTripMs
    if (ok && keysDeleted !== null) ack.keysDeleted = keysDeleted
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(ack))
    if (command.type === 'session.end' && ok) stop()
    if (command.type === 'session.restart' && ok) {
      // After the ack: this link ends with its socket; the backend's reconnect attaches a new one.
      detachListeners()
      stop()
      sock.end(restartError(command.reason || 'restart'))
    }
  }

  function connect() {
    reconnectTimer = null
    if (closed) return
    const socket = new WebSocket(url, { headers: token ? { Authorization: `Bearer ${token}` } : {}, handshakeTimeout: 10_000 })
    ws = socket
    socket.on('open', () => {
      stats.connects++
      reconnectDelay = reconnectInitialMs
      socket.send(JSON.stringify(runtimeInfo(runtimeId, library)))
      resend()
      // A link that came back (perhaps to another replica) is told the open session is here, once: commands
      // for it then reach this connection even if the session stays silent.
      if (stats.connects > 1 && whatsappOpen) {
        const present = { type: 'activity', messages: 0, receipts: 0, notifications: 0 }
        if (lastInbound) present.lastInboundAt = lastInbound.toISOString()
        enqueue(present)
      }
      flush()
    })
    socket.on('message', (data) => {
      let frame
      try {
        frame = JSON.parse(String(data))
      } catch {
        return
      }
      for (const item of Array.isArray(frame) ? frame : [frame]) {
        if (item?.type === 'events.ack' && Number.isInteger(item.upTo)) acknowledged(item.upTo)
        else if (item?.type === 'error') log.warn?.({ error: item.error, details: item.details }, 'sidecar refused events')
        else if (['session.end', 'auth.clear', 'session.probe', 'session.restart'].includes(item?.type)) obey(item)
      }
    })
    socket.on('error', (error) => log.debug?.({ err: error.message }, 'sidecar link error'))
    socket.on('close', () => {
      if (ws === socket) ws = null
      if (closed) return
      const delay = Math.min(reconnectDelay, reconnectMaxMs) * (0.5 + Math.random() / 2)
      reconnectDelay = Math.min(reconnectDelay * 2, reconnectMaxMs)
      reconnectTimer = setTimeout(connect, delay)
      reconnectTimer.unref?.()
    })
  }

  const taps = options.logger?.[Symbol.for('wa-sidecar.taps')]
  sock.ev.on('connection.update', onConnectionUpdate)
  sock.ev.on('messages.upsert', onMessagesUpsert)
  sock.ev.on('messages.update', onMessagesUpdate)
  sock.ev.on('message-capping.update', onMessageCapping)
  for (const [event, listener] of inboundListeners) sock.ws?.on?.(event, listener)
  taps?.add(onAppStateFailure)

  function detachListeners() {
    sock.ev.off('connection.update', onConnectionUpdate)
    sock.ev.off('messages.upsert', onMessagesUpsert)
    sock.ev.off('messages.update', onMessagesUpdate)
    sock.ev.off('message-capping.update', onMessageCapping)
    for (const [event, listener] of inboundListeners) sock.ws?.off?.(event, listener)
    clearInterval(activityTimer)
    taps?.delete(onAppStateFailure)
  }

  function stop() {
    flush()
    closed = true
    clearTimeout(reconnectTimer)
    clearTimeout(flushTimer)
    const socket = ws
    // Let queued frames (the ack) go out before closing.
    if (socket) setTimeout(() => socket.close(1000), 50).unref?.()
  }

  connect()
  return {
    stats,
    get buffered() { return buffer.length },
    get unacknowledged() { return unacked.length },
    runtimeId,
    get connected() { return !!ws && ws.readyState === WebSocket.OPEN },
    detach() {
      detachListeners()
      stop()
    },
  }
}

module.exports = { attachSidecar, recordingKeyStore, sidecarLogger, appStateFailure, loggedOutError, restartError, probeRoundTrip, installedLibrary }
