// Message loss against the real makeWASocket (7.0.0-rc14) on the loopback stand-in and a real sidecar process,
// with real Signal cryptography: two peers send a message whose MAC is flipped; Baileys fails on each (Bad MAC),
// upserts the CIPHERTEXT stub and sends a retry receipt. The stand-in answers one retry receipt by delivering the
// genuine ciphertext under the same message id (Baileys decrypts it: recovered) and never answers the other
// (lost once the sidecar's --loss-deadline passes).
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { createRequire } from 'node:module'
import pino from 'pino'
import { eventually, startSidecar, TOKEN } from './sidecar.mjs'
import { checked } from './schema.mjs'
import { startStandIn, pairedDevice, openSocket, ME_PN } from './standin.mjs'
import { party, bundleOf, sealed, messageNode } from './signal.mjs'

const require = createRequire(import.meta.url)
const { attachSidecar } = require('../index.cjs')

const quiet = pino({ level: 'silent' })
const JID = '15550001111@s.whatsapp.net'
const PHONE = 8401

let sidecar
let standIn
before(async () => {
  sidecar = await startSidecar(0, ['--loss-deadline', '2s'])
  standIn = await startStandIn()
})
after(async () => {
  await standIn?.close()
  await sidecar?.stop()
})

async function counter(name, labels) {
  const text = await sidecar.metrics()
  const line = text.split('\n').find((l) => l.startsWith(`${name}{`) && labels.every((label) => l.includes(label)))
  return line ? Number(line.split(' ').pop()) : 0
}

const retryReceipt = (id) => standIn.received.find((node) => node.tag === 'receipt' && node.attrs.type === 'retry' && node.attrs.id === id)

test('a message re-sent after the retry receipt is recovered; one never re-sent is lost after the deadline', async () => {
  const device = await pairedDevice()
  let link
  const { sock, conn } = await openSocket(standIn, device, {
    logger: quiet,
    onSocket: (s) => { link = attachSidecar(s, { organizationId: 4, organizationPhoneId: PHONE, url: sidecar.ws, token: TOKEN, logger: quiet, phoneJid: JID }) },
  })
  try {
    const receiver = { creds: device.creds, auth: { creds: device.creds, keys: device.store.keys } }
    const alice = party('15550003331@s.whatsapp.net')
    const bob = party('15550003332@s.whatsapp.net')
    const fromAlice = await sealed(alice, ME_PN, await bundleOf(receiver), 'hello from alice')
    const fromBob = await sealed(bob, ME_PN, await bundleOf(receiver), 'hello from bob')
    await conn.send(messageNode(alice.jid, '3EB0A11CE0000001', fromAlice.type, fromAlice.tampered))
    await conn.send(messageNode(bob.jid, '3EB0B0B000000002', fromBob.type, fromBob.tampered))
    await eventually(() => retryReceipt('3EB0A11CE0000001') && retryReceipt('3EB0B0B000000002'), 'Baileys sent both retry receipts')
    await eventually(async () => (await counter('whatsapp_messages_undecryptable_total', ['organization_id="4"'])) === 2, 'both failures counted')
    // The sender answers Alice's retry receipt: the genuine ciphertext, same id.
    await conn.send(messageNode(alice.jid, '3EB0A11CE0000001', fromAlice.type, fromAlice.genuine))
    await eventually(async () => (await counter('whatsapp_messages_recovered_total', ['organization_id="4"', 'via="retry"'])) === 1, 'recovered via retry')
    await eventually(async () => (await counter('whatsapp_messages_lost_total', ['organization_id="4"'])) === 1, "Bob's message lost after the deadline")
    const session = await sidecar.get(`/v1/sessions/${PHONE}`)
    assert.equal(session.messagesLost, 1)
    assert.equal(session.state, 'active', 'loss closes nothing')
  } finally {
    link?.detach()
    sock.end(undefined)
  }
})

test('every frame matched the runtime link schema', () => {
  assert.ok(checked.frames > 0)
  assert.deepEqual(checked.violations, [])
})
