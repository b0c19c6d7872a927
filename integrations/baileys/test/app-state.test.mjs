// Baileys 7's app-state signals, produced by the real makeWASocket (7.0.0-rc14) against the loopback stand-in:
// each way a sync can fail is served by the stand-in, Baileys logs what it logs, the adapter recognises it and
// a real sidecar counts it. The Baileys lines produced are the golden lines of
// tests/fixtures/baileys/app_state_7.jsonl (WA_UPDATE_GOLDEN=1 rewrites them; otherwise they are checked).
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { createRequire } from 'node:module'
import fs from 'node:fs'
import path from 'node:path'
import * as B from '@whiskeysockets/baileys'
import pino from 'pino'
import { eventually, startSidecar, REPO, TOKEN } from './sidecar.mjs'
import { checked } from './schema.mjs'
import {
  startStandIn, pairedDevice, openSocket, appStateKey, encodePatches, patchNode, collectionResult, snapshotNode, ME_PN,
} from './standin.mjs'

const require = createRequire(import.meta.url)
const { attachSidecar, sidecarLogger, appStateFailure } = require('../index.cjs')

const GOLDEN = path.join(REPO, 'tests', 'fixtures', 'baileys', 'app_state_7.jsonl')
const KEY_A = appStateKey(0xa1)
const KEY_B = appStateKey(0xb2)
const PHONE_JID = ME_PN.replace(':7', '')
const produced = []

let sidecar
let standIn
before(async () => {
  sidecar = await startSidecar()
  standIn = await startStandIn()
})
after(async () => {
  await standIn?.close()
  await sidecar?.stop()
  const text = produced.map((entry) => JSON.stringify(entry).replaceAll(REPO, '/srv/backend')).join('\n') + '\n'
  if (process.env.WA_UPDATE_GOLDEN) fs.writeFileSync(GOLDEN, text)
})

// An ended socket's event buffer would keep its 30 s timer (and this process) alive.
function endSocket(sock) {
  sock.end(undefined)
  sock.ev.flush()
}

async function failures(kind) {
  const text = await sidecar.metrics()
  const line = text.split('\n').find((l) => l.startsWith(`whatsapp_app_state_sync_failures_total{collection="regular_high",kind="${kind}"}`))
  return line ? Number(line.split(' ').pop()) : 0
}

// One scenario: a socket with the device's state, the stand-in answering syncs with `serve`, a server_sync
// notification; returns once Baileys logged `expected` and the sidecar counted it.
async function scenario({ label, phoneId, device, serve, expected, kind, macs = true }) {
  const lines = []
  const base = pino({ level: 'trace' }, { write: (line) => lines.push(JSON.parse(line)) })
  // The bindings a backend gives its per-session logger; ingest-logs reads them from the lines.
  const logger = sidecarLogger(base).child({ organizationId: 1, organizationPhoneId: phoneId, phoneJid: PHONE_JID })
  const before = await failures(kind)
  standIn.appState = serve
  const { sock, conn } = await openSocket(standIn, device, {
    logger, appStateMacVerification: macs ? { patch: true, snapshot: true } : undefined,
  })
  const link = attachSidecar(sock, { organizationId: 1, organizationPhoneId: phoneId, url: sidecar.ws, token: TOKEN, logger })
  try {
    await standIn.serverSync(conn, 'regular_high')
    const line = await eventually(() => lines.find((l) => expected.test(l.msg ?? '')), `Baileys logs ${expected}`)
    assert.equal(appStateFailure(line)?.kind, kind, `the adapter reads ${line.msg} as ${kind}`)
    await eventually(async () => (await failures(kind)) === before + 1, `the sidecar counts kind=${kind}`)
    const { pid, hostname, time, ...stable } = line
    produced.push({ label, baileys: '7.0.0-rc14', line: { ...stable, time: '2026-11-30T06:00:00.000Z' } })
    if (!process.env.WA_UPDATE_GOLDEN) {
      const golden = fs.readFileSync(GOLDEN, 'utf8').trim().split('\n').map((l) => JSON.parse(l)).find((g) => g.label === label)
      assert.ok(golden, `golden line ${label} (WA_UPDATE_GOLDEN=1 writes it)`)
      assert.equal(golden.line.msg, line.msg, 'the golden line is what Baileys logs')
      assert.equal(golden.line.name, line.name)
    }
    return { line, lines }
  } finally {
    link.detach()
    endSocket(sock)
  }
}

const stats = async (phoneId) => (await sidecar.get(`/v1/sessions/${phoneId}/stats`))

test('a patch signed under another key: "failed to decode patch" (Invalid patch mac) counts as a bad decrypt', async () => {
  const { patches } = await encodePatches(KEY_A)
  await scenario({
    label: 'appstate7.patch_mac', phoneId: 7101, kind: 'patch_mac', expected: /^failed to decode patch, skipping$/,
    device: await pairedDevice({ key: KEY_B }),
    serve: (c) => collectionResult(c.attrs.name, patches[0].version, [{ tag: 'patches', attrs: {}, content: patches.map((p) => patchNode(p)) }]),
  })
  await eventually(async () => (await stats(7101)).badDecryptErrors === 1, 'one bad decrypt counted')
})

test('state that no longer hashes to the server\'s: "LTHash verification failed, skipping remaining patches"', async () => {
  // The server's state holds a mutation this device never applied; its next patch's snapshot MAC covers it.
  const { patches } = await encodePatches(KEY_A, 2)
  await scenario({
    label: 'appstate7.lthash_patch', phoneId: 7102, kind: 'lthash_patch', expected: /^LTHash verification failed, skipping/,
    device: await pairedDevice({ key: KEY_A }),
    serve: (c) => collectionResult(c.attrs.name, patches[1].version, [{ tag: 'patches', attrs: {}, content: [patchNode(patches[1])] }]),
  })
  await eventually(async () => (await stats(7102)).badDecryptErrors === 1, 'one bad decrypt counted')
})

test('a snapshot whose MAC does not match: "LTHash verification failed on snapshot" is counted only', async () => {
  const { patches } = await encodePatches(KEY_A, 2)
  await scenario({
    label: 'appstate7.lthash_snapshot', phoneId: 7103, kind: 'lthash_snapshot', expected: /^LTHash verification failed on snapshot/,
    device: await pairedDevice({ key: KEY_A }),
    serve: async (c) => collectionResult(c.attrs.name, 2, [await snapshotNode(standIn, {
      records: patches.map((p) => p.patch.mutations[0].record), version: 2, mac: Buffer.alloc(32, 7),
    })]),
  })
  const after = await stats(7103)
  assert.equal(after.badDecryptErrors, 0, 'not toward the limit')
})

test('no key for the patch: "blocked on missing key ... parking" is counted only', async () => {
  const { patches } = await encodePatches(KEY_A)
  await scenario({
    label: 'appstate7.missing_key', phoneId: 7104, kind: 'missing_key', expected: /blocked on missing key from v\d+, parking/, macs: false,
    device: await pairedDevice(),
    serve: (c) => collectionResult(c.attrs.name, patches[0].version, [{ tag: 'patches', attrs: {}, content: patches.map((p) => patchNode(p)) }]),
  })
})

test('an external patch that cannot be downloaded: "forcing snapshot retry", then "giving up"', async () => {
  const { patches } = await encodePatches(KEY_A)
  const missingBlob = { mediaKey: Buffer.alloc(32, 1), directPath: '/v/t62.1234-24/gone.enc', handle: 'h', fileSizeBytes: 10, fileSha256: Buffer.alloc(32), fileEncSha256: Buffer.alloc(32) }
  const serve = (c) => collectionResult(c.attrs.name, patches[0].version, [{ tag: 'patches', attrs: {}, content: [patchNode(patches[0], { externalMutations: missingBlob })] }])
  const { lines } = await scenario({
    label: 'appstate7.gave_up', phoneId: 7105, kind: 'gave_up', expected: /^failed to sync regular_high from v\d+, giving up$/, macs: false,
    device: await pairedDevice({ key: KEY_A }), serve,
  })
  const retry = lines.find((l) => /forcing snapshot retry$/.test(l.msg ?? ''))
  assert.ok(retry, 'Baileys retried from a snapshot first')
  assert.equal(appStateFailure(retry)?.kind, 'snapshot_retry')
  await eventually(async () => (await failures('snapshot_retry')) >= 1, 'the retry is counted too')
  const { pid, hostname, time, ...stable } = retry
  produced.push({ label: 'appstate7.snapshot_retry', baileys: '7.0.0-rc14', line: { ...stable, time: '2026-11-30T06:00:00.000Z' } })
})

test('without MAC verification a patch under another key syncs silently: nothing to count', async () => {
  const { patches } = await encodePatches(KEY_A)
  const lines = []
  const logger = sidecarLogger(pino({ level: 'trace' }, { write: (line) => lines.push(JSON.parse(line)) }))
  standIn.appState = (c) => collectionResult(c.attrs.name, patches[0].version, [{ tag: 'patches', attrs: {}, content: patches.map((p) => patchNode(p)) }])
  const { sock, conn } = await openSocket(standIn, await pairedDevice({ key: KEY_B }), { logger })
  try {
    await standIn.serverSync(conn, 'regular_high')
    await eventually(() => lines.find((l) => /^synced regular_high to v\d+$/.test(l.msg ?? '')), 'Baileys reports the sync done')
    assert.deepEqual(lines.filter((l) => appStateFailure(l)), [], 'no line shows the failure')
  } finally {
    endSocket(sock)
  }
})

test('every frame sent here matched the runtime link\'s JSON Schema', () => {
  assert.ok(checked.frames > 0)
  assert.deepEqual(checked.violations, [])
})
